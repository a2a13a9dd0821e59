"""Host syncs in the training loop (#20): on a GPU, every read of a device tensor's value on the host (float(loss),
.item(), .tolist(), bool(t), a boolean mask's nonzero, ...) waits for the queued kernels and stops the CPU from
queueing the next micro-batch. The trainer reads the device once per optimizer step (the step's loss and
grad-norm together, which the non-finite check needs before the optimizer steps), plus once per logging step for
the objectives' metrics; never once per micro-batch.

CI has no GPU, so `DeviceReads` plays one on the CPU: what Trainer.to_device returns (copied, so the host's batch
stays apart), the model's parameters, and everything computed from them are "on the device", and each op that
hands such a tensor's values to the host is counted. Reads inside the model's forward (fasttune/models,
fasttune/kernels) are the model's own and left out here: this test holds the trainer and its objectives. So is
GRPO's sampling (generate, once per step), whose completions the reward functions read as text.
"""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from fasttune import DPOConfig, DPOTrainer, FastLanguageModel, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer
from fasttune import ORPOConfig, ORPOTrainer, SFTConfig, SFTTrainer
from fasttune.train.loop import Trainer

aten = torch.ops.aten
# Ops whose result the host must wait for on a GPU: a value (item, float(), int(), bool()), or an output whose size
# depends on the data (nonzero, boolean masks).
VALUE_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.nonzero.default,
             aten.masked_select.default}


class DeviceReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.on_device = WeakTensorKeyDictionary()
        self.reads = []  # one stack summary per read

    def mark(self, tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.on_device[t] = True

    def is_on_device(self, t) -> bool:
        return isinstance(t, torch.nn.Parameter) or t in self.on_device

    def record(self, what):
        here = [f"{f.filename.rsplit('/src/', 1)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                if "/src/fasttune/" in f.filename]
        if not any("fasttune/models/" in f or "fasttune/kernels/" in f or f.endswith(" sample") for f in here):
            self.reads.append((what, here[-3:]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device = any(self.is_on_device(t) for t in inputs)
        if device and (func in VALUE_OPS or func is aten.index.Tensor and any(
                t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])):
            self.record(func)
        out = func(*args, **kwargs)
        if device:
            self.mark(tree_flatten(out)[0])
        return out


@pytest.fixture
def device_reads(monkeypatch):
    mode = DeviceReads()
    to_device = Trainer.to_device

    def copied_to_device(self, batch):
        out = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in to_device(self, batch).items()}
        mode.mark(out.values())
        return out

    def reader(name):
        method = getattr(torch.Tensor, name)

        def read(t, *a, **k):
            if mode.is_on_device(t):
                mode.record(name)
            return method(t, *a, **k)
        return read

    monkeypatch.setattr(Trainer, "to_device", copied_to_device)
    for name in ("tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, reader(name))
    return mode


def _sft_rows(n):
    return [{"text": f"sample {i} " + "abc " * (1 + i % 5)} for i in range(n)]


def _pairs(n):
    return [{"prompt": f"q{i} " + "x" * (i % 3), "chosen": " good" + "!" * (i % 2), "rejected": " bad"}
            for i in range(n)]


def _unpaired(n):
    return [{"prompt": f"q{i} " + "x" * (i % 3), "completion": " yes" if i % 2 else " no", "label": bool(i % 2)}
            for i in range(n)]


def _prompts(n):
    return [{"prompt": f"q{i} " + "ab" * (i % 3)} for i in range(n // 4)]


def _grpo(model, tokenizer, train_dataset, args):
    return GRPOTrainer(model, reward_funcs=["length"], args=args, train_dataset=train_dataset,
                       processing_class=tokenizer)


GRPO_ARGS = {"num_generations": 4, "max_completion_length": 4, "beta": 0.1, "num_iterations": 2}
CASES = {"sft": (SFTTrainer, SFTConfig, _sft_rows), "dpo": (DPOTrainer, DPOConfig, _pairs),
         "orpo": (ORPOTrainer, ORPOConfig, _pairs), "kto": (KTOTrainer, KTOConfig, _unpaired),
         "grpo": (_grpo, lambda **kw: GRPOConfig(**kw, **GRPO_ARGS), _prompts)}
# Reads per optimizer step: the step's loss and grad-norm (one read), the objective's metrics on a logging step
# (one read), KTO's KL estimate of the accumulated batch (one read, before the step's forward passes).
ALLOWED = {"sft": 1, "dpo": 2, "orpo": 2, "kto": 3, "grpo": 2}


@pytest.mark.parametrize("objective", sorted(CASES))
def test_no_host_read_per_micro_batch(objective, device_reads, tiny_model_dir):
    cls, config, rows = CASES[objective]
    model, tok = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")))
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    steps, ga = 2, 4
    trainer = cls(model=model, tokenizer=tok, train_dataset=rows(2 * ga * steps),
                  args=config(output_dir=str(tiny_model_dir("llama").parent / "out"), per_device_train_batch_size=2,
                              gradient_accumulation_steps=ga, max_steps=steps, logging_steps=1, save_steps=0,
                              report_to="none"))
    with device_reads:
        trainer.train()
    assert len(trainer.log_history) == steps
    found = "\n".join(f"{what}: {' < '.join(reversed(where))}" for what, where in device_reads.reads)
    assert len(device_reads.reads) == ALLOWED[objective] * steps, f"host reads of device tensors:\n{found}"
