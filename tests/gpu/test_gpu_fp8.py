"""GPU check (skipped without CUDA): an FP8 checkpoint dequantised on the card as it loads (quant/fp8.py) gives the
weights the CPU's dequantisation gives, in fp32 and into NF4."""
import pytest
import torch
from fp8_checkpoint import to_fp8_checkpoint
from tiny import hf_model, save_hf

from fasttune import FastLanguageModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_fp8_dequantised_on_the_card_equals_the_cpu(family, tmp_path, tiny_tokenizer):
    folder = to_fp8_checkpoint(save_hf(hf_model(family), tmp_path / "m", tiny_tokenizer), tmp_path / "fp8",
                               block=(16, 32))
    cpu, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu")
    gpu, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device="cuda")
    on_card = gpu.state_dict()
    for name, a in cpu.state_dict().items():  # the FP8 weights: the layers' projections and experts
        if ".layers." in name and name.endswith(("proj.weight", "gate_up_proj", "down_proj")):
            torch.testing.assert_close(on_card[name].cpu(), a, rtol=0, atol=0, msg=name)
    nf4, _ = FastLanguageModel.from_pretrained(str(folder), dtype=torch.bfloat16, device="cuda", load_in_4bit=True)
    ids = torch.randint(3, 300, (1, 16), device="cuda")
    with torch.no_grad():
        want = gpu(ids).logits
        assert (nf4(ids).logits.float() - want).abs().max() < 0.15 * want.abs().max()
