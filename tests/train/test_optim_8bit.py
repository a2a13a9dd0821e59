"""optim="adamw_8bit" (the peer notebooks' choice) is bitsandbytes' 8-bit AdamW with the config's settings."""
import pytest
import torch

from fasttune.errors import ConfigError
from fasttune.train.config import SFTConfig
from fasttune.train.optim import build_optimizer

bnb = pytest.importorskip("bitsandbytes")


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    model.embedding_param_names = ()  # the one member of the model interface build_optimizer reads
    return model


@pytest.mark.parametrize("name,cls", [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit")])
def test_8bit_adamw_is_bitsandbytes_and_steps_like_it(name, cls):
    cfg = SFTConfig(optim=name, learning_rate=1e-3, weight_decay=0.01)
    ours, ref = _model(), _model()
    opt = build_optimizer(ours, cfg)
    assert type(opt).__name__ == cls and opt.defaults["weight_decay"] == 0.01
    # Biases are not decayed (transformers' Trainer rule).
    groups = [{"params": [p for n, p in ref.named_parameters() if not n.endswith("bias")]},
              {"params": [p for n, p in ref.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
    ref_opt = getattr(bnb.optim, cls)(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    x = torch.randn(8, 64)
    for model, o in ((ours, opt), (ref, ref_opt)):
        for _ in range(3):
            model(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt.state[next(iter(ours[0].parameters()))]["state1"].dtype == torch.uint8  # 8-bit moments


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="adamw_8bit"):
        SFTConfig(optim="adamw_9bit")
