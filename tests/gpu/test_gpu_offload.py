"""GPU checks (skipped without CUDA) of models/offload.py's stream handling when Python runs ahead of the GPU, as
it does in every long-sequence step: the memory of saved tensors is reused in stream order (no cache growth), no
copy reads memory that was handed out again, and the side stream keeps no blocks of its own."""
import pytest
import torch
from peft_oracle import randomize_lora_b

from fasttune import FastLanguageModel
from fasttune.kernels.dispatch import side_stream
from fasttune.models.offload import LayerInputOffloader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MIB = 1 << 20


def _busy(ms: float = 300):
    """Queue ~`ms` of GPU time on the current stream, so the host runs ahead of the GPU from here."""
    torch.cuda._sleep(int(ms * 1e-3 * torch.cuda.get_device_properties(0).clock_rate * 1e3))


def _layers(store, n: int, numel: int):
    """n "layers" of a forward pass: each makes its input (value i), saves it and drops it, as the decoder does
    -> the slots."""
    slots = []
    for i in range(n):
        x = torch.full((numel,), float(i), device="cuda")
        store.release_copied()  # as _OffloadedLayer.forward does before each save
        slots.append(store.save(x))
        del x
    store.release_copied()  # as the decoder does after its last offloaded layer
    return slots


def test_saved_inputs_do_not_grow_the_cache_while_the_host_runs_ahead():
    """16 layers of 64 MiB inputs queued behind 300 ms of GPU work: the freed inputs' blocks serve the next layers
    in stream order. (With record_stream the blocks waited for copies the GPU had not run yet, and each layer
    reserved a new one: 16 x 64 MiB here, tens of GiB at 32K tokens on an 8B model.)"""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    store = LayerInputOffloader(torch.device("cuda"), offload=True, host_bytes=1 << 32)
    _busy()
    slots = _layers(store, 16, 16 * MIB)  # fp32: 64 MiB each
    grown = torch.cuda.max_memory_reserved() - before
    for i in reversed(slots):
        assert store.load(i).eq(float(i)).all()
    assert grown <= 4 * 64 * MIB, grown / MIB


def test_copies_never_read_memory_handed_out_again():
    """The values come back right when the host is far ahead and every freed block is written over at once."""
    store = LayerInputOffloader(torch.device("cuda"), offload=True, host_bytes=1 << 32)
    _busy()
    slots = []
    for i in range(12):
        x = torch.full((4 * MIB,), float(i), device="cuda")
        store.release_copied()
        slots.append(store.save(x))
        del x
        torch.full((4 * MIB,), -1.0, device="cuda")  # takes a freed block and writes it
    store.release_copied()
    _busy(100)
    for i in reversed(slots):
        got = store.load(i)
        torch.full((4 * MIB,), -2.0, device="cuda")
        assert got.eq(float(i)).all(), i


def test_offload_training_keeps_no_side_stream_blocks(tiny_model_dir, monkeypatch):
    """Steps of a tiny model with the host ahead of the GPU, the attention block kept too (its store's copies are
    released with the layer inputs'): gradients equal to on-device recompute, and the copy stream's pool holds
    nothing (the fetched tensors' blocks served only that stream, and grew with each layer fetched ahead)."""
    monkeypatch.setattr("fasttune.models.decoder.block_pays", lambda *args: True)  # (a tiny model never pays)
    torch.cuda.empty_cache()  # (blocks other tests left cached)
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.bfloat16, device="cuda")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    model.train()
    randomize_lora_b(model)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 64), device="cuda")
    grads = {}
    for mode in (True, "offload"):
        model.gradient_checkpointing = mode
        for _ in range(3):  # the same batch: each step's gradients alike
            model.zero_grad(set_to_none=True)
            _busy(50)
            model(input_ids=ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for n in grads[True]:
        torch.testing.assert_close(grads["offload"][n], grads[True][n], rtol=0, atol=0, msg=n)
    torch.cuda.synchronize()
    side = side_stream(torch.device("cuda")).cuda_stream
    assert sum(s["total_size"] for s in torch.cuda.memory_snapshot() if s["stream"] == side) == 0
