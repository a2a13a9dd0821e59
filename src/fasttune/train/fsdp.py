"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models that do not fit one GPU: SFTConfig(fsdp=True) under
torchrun shards every parameter (frozen base included) over the ranks; each decoder layer all-gathers its weights
just before it runs (forward, and the recompute in backward) and frees them after.

Gradients are reduce-scattered by FSDP (summed: the loss is already divided by the global target count), the
optimizer holds only this rank's shard, and checkpoints/adapters hold full tensors gathered with
`DTensor.full_tensor()` (a collective: every rank calls it, rank 0 writes), so they resume on any world size, with
or without FSDP. NF4 and int8 weights (integer storage held as buffers, which fully_shard leaves whole) become frozen
parameters first (shardable_quant_storage), so they are sharded too, as in FSDP-QLoRA: each rank keeps its share of
the packed NF4 weights and their 8-bit block scales (int8: of the int8 weights) and all-gathers a layer's before it
runs (NF4 expert stacks too); FP8 weights likewise, held as their bytes (the mixed-precision policy would cast a
floating parameter). The small fp32 scales stay whole on every rank.
"""
from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager

import torch

from fasttune.errors import ConfigError
# The sharding queries live below peft/ and export/, which use them too; re-exported here for train/.
from fasttune.sharding import full_tensor, gather_state, is_sharded, writes_here  # noqa: F401


def check_fsdp(model, args, world: int):
    """ConfigError for combinations that cannot run sharded, and for a model loaded for FSDP (from_pretrained with
    fsdp=True, still in host memory) given to a trainer without fsdp=True; called when a trainer is built (every
    fasttune trainer runs sharded: tests/train/test_fsdp.py; `world`: the launch's processes)."""
    if not getattr(args, "fsdp", False):
        if getattr(model, "fsdp_device", None) is not None:
            raise ConfigError("The model was loaded with from_pretrained(fsdp=True): it waits in host memory for FSDP "
                              "to shard it onto the GPUs. Set fsdp=True in the trainer's config (under torchrun: "
                              "`fasttune train --gpus N --fsdp`), or load it without fsdp=True.")
        return
    from fasttune.models.causal_lm import CausalLM

    if world < 2:
        raise ConfigError("fsdp=True shards the model over the processes of a torchrun launch, but this is a single "
                          "process. Launch with `fasttune train --gpus N --fsdp ...` or `torchrun --nproc-per-node N "
                          "...` (N >= 2), or set fsdp=False.")
    if not isinstance(model, CausalLM):
        raise ConfigError("fsdp=True needs fasttune's own decoder; this model runs through the transformers fallback. "
                          "Set fsdp=False (data-parallel: each GPU holds the whole model).")
    from fasttune.models.host_embedding import HostEmbedding
    from fasttune.models.host_head import HostLMHead

    for name, held in (("offload_lm_head", isinstance(model.lm_head, HostLMHead)),
                       ("offload_embedding", isinstance(model.model.embed_tokens, HostEmbedding))):
        if held:  # (FSDP would shard the host-held weight onto the GPUs, which neither option means)
            raise ConfigError(f"fsdp=True shards the model over the GPUs, but {name}=True keeps a weight whole in "
                              f"host memory; load without {name} (each GPU then holds only its shard).")


def shard_model(model):
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm_head), in place. LoRA weights stay
    fp32 masters; forward/backward compute in the model's dtype; gradients are reduced in fp32. A model loaded with
    from_pretrained(fsdp=True) (`model.fsdp_device` naming its GPU; in host memory on rank 0, on the meta device on
    the others) moves there as it is sharded: the parts outside the decoder layers first, then each layer whole
    (rank 0 sending it to the others: fsdp_staged.py) just before fully_shard keeps this rank's shard of it, so the
    GPU's peak is the shards plus one layer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fasttune.train.distributed import broadcast_from_rank0
    from fasttune.train.fsdp_staged import any_rank_on_meta, place, place_outside

    if is_sharded(model):
        return model  # a second trainer on the same model (e.g. a warm-up run): already sharded
    shardable_quant_storage(model)
    dtype = model.dtype
    # Mixed parameter dtypes (bf16 base, fp32 LoRA) all-gather in one dtype; fp32 models need no cast.
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    layers = list(model.model.layers)
    staged = getattr(model, "fsdp_device", None)  # from_pretrained(fsdp=True): not on its GPU yet
    if staged is not None:
        fill = any_rank_on_meta(model, staged)
        place_outside(model, layers, staged, fill)
    else:  # one adapter on every rank before each rank keeps its shard (place() does it for a staged model)
        broadcast_from_rank0([p for p in model.parameters() if p.requires_grad])
    for layer in layers:
        if staged is not None:
            place(layer, staged, fill)  # one whole layer on the GPU at a time: fully_shard keeps this rank's shard
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if staged is not None:
        del model.fsdp_device
    # Explicit prefetch: each layer's all-gather starts while the layer before it (forward) or after it (backward)
    # computes, rather than when the layer is reached; the recompute inside backward reorders the hooks FSDP's
    # implicit backward prefetch reads. One more layer's weights are whole at a time.
    for i, layer in enumerate(layers):
        if i + 1 < len(layers):
            layer.set_modules_to_forward_prefetch([layers[i + 1]])
        if i > 0:
            layer.set_modules_to_backward_prefetch([layers[i - 1]])
    for m in model.modules():
        if is_sharded(m):
            # Sum, not mean: the loss is already divided by the global target count. A plain SUM (no PREMUL_SUM,
            # which gloo lacks) with nothing to divide by afterwards.
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the unsharded weights' memory back to the device (auto checkpointing reads it)
    return model


def shardable_quant_storage(model) -> int:
    """Make the storage of `model`'s quantised Linears and expert stacks (QuantLinear, QuantExpertWeight: NF4's
    packed weights and 8-bit block scales, int8's weights, FP8's weights held as their bytes) frozen nn.Parameters
    instead of buffers, in place, so that fully_shard shards them (it shards parameters only; FSDP2 does not cast
    integer parameters and all-gathers a group of mixed dtypes as bytes). FP8 weights become uint8 Parameters of
    the same shape, read back as FP8 (quant/linear.py's hold_fp8_as_bytes): a floating parameter would be cast by the
    mixed-precision policy. Floating-point scales stay buffers (small; the policy would cast them too).
    Inside a layer's forward and backward the module then holds the whole tensors again (FSDP2's all-gather), which
    is all the layers read. Returns the number of tensors changed; 0, with a warning, on a torch whose fully_shard
    cannot take integer parameters (integer_params_shardable): the storage then stays whole on every rank."""
    from torch import nn

    from fasttune.quant.experts import QuantExpertWeight
    from fasttune.quant.linear import QuantLinear, hold_fp8_as_bytes

    names = {"nf4": ("packed", "absmax"), "int8": ("qweight",)}
    quantised = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantExpertWeight))]
    if quantised and not integer_params_shardable():
        warnings.warn(f"torch {torch.__version__}: FSDP2 cannot shard integer parameters before torch 2.13 "
                      f"(pytorch/pytorch#177844), so the quantised weights stay whole on every GPU (the 16-bit ones "
                      f"and LoRA are sharded). Upgrade torch to shard them too.")
        return 0
    changed = 0
    for module in quantised:
        if module.quant_type == "fp8" and "qweight" in module._buffers:
            hold_fp8_as_bytes(module)
            changed += 1
        for name in names.get(module.quant_type, ()):
            t = module._buffers.get(name)
            if t is None or t.is_floating_point():  # (an NF4 absmax without double quantisation is fp32)
                continue
            del module._buffers[name]
            module.register_parameter(name, nn.Parameter(t, requires_grad=False))
            changed += 1
    return changed


@contextmanager
def unsharded(model):
    """Every FSDP module of `model` all-gathered for the block and kept whole through its forwards (each rank holds
    the whole model meanwhile, as TRL's unwrap_model_for_generation gathers it), so that the forwards inside need no
    collectives and each rank may run as many as its own work needs (GRPO's sampling: each rank's completions stop
    at their own lengths); resharded after. Entering and leaving are collectives (every rank must). Nested, the
    outermost block does the work (GRPO's evaluation around its rollouts). Nothing for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if model.__dict__.get("_unsharded_depth", 0):
        model._unsharded_depth += 1
        try:
            yield
        finally:
            model._unsharded_depth -= 1
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    layers = [m for m in modules if m is not model]  # (the root never reshards after forward: FSDP's rule)
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()
    model._unsharded_depth = 1
    try:
        yield
    finally:
        model._unsharded_depth = 0
        for m in modules:
            m.reshard()
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)


@contextmanager
def all_unsharded(*models):
    """`unsharded` for each of `models` that is sharded (None and unsharded ones are skipped), entered in order:
    a policy and the teacher it is distilled from, say. Collective like unsharded: every rank enters the same ones."""
    with ExitStack() as stack:
        for model in models:
            if model is not None and is_sharded(model):
                stack.enter_context(unsharded(model))
        yield


def integer_params_shardable() -> bool:
    """Whether this torch's fully_shard takes parameters of integer dtype: before 2.13 it made each sharded parameter
    require gradients before copying the flag, which an integer tensor cannot (pytorch/pytorch#177844)."""
    from torch.torch_version import TorchVersion

    return TorchVersion(torch.__version__) >= "2.13"


def full_optimizer_state(optimizer, keep: bool) -> dict | None:
    """optimizer.state_dict() with sharded state (exp_avg, exp_avg_sq) gathered to full CPU tensors: the same
    format a single process writes, so the checkpoint resumes on any number of ranks."""
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        state[idx] = {k: (full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v)
                      for k, v in sd["state"][idx].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: this rank's shard for a sharded param (no communication), else itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    full = full.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def shard_optimizer_state(sd: dict, optimizer) -> dict:
    """A full (single-process format) optimizer state laid out for this optimizer's (possibly sharded) params."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, entry in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {k: (shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v)
                      for k, v in entry.items()}
    return {"state": state, "param_groups": sd["param_groups"]}
