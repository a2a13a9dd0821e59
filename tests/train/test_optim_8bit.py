"""optim="adamw_8bit" (the peer notebooks' choice) is bitsandbytes' 8-bit AdamW with the config's settings; the other
optimizers transformers names are built as its Trainer builds them."""
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


def _steps_equal(ours, opt, ref, ref_opt, steps: int):
    """`steps` identical updates of both models by their optimizers leave bit-equal parameters."""
    x = torch.randn(8, 64)
    for model, o in ((ours, opt), (ref, ref_opt)):
        for _ in range(steps):
            model(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
    _steps_equal(ours, opt, ref, ref_opt, 3)
    assert opt.state[next(iter(ours[0].parameters()))]["state1"].dtype == torch.uint8  # 8-bit moments


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="adamw_8bit"):
        SFTConfig(optim="adamw_9bit")


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rmsprop", "adafactor", "lion_32bit", "lion_8bit",
                                  "rmsprop_bnb_8bit", "ademamix"])
def test_transformers_other_optimizers_are_built_as_its_trainer_builds_them(name):
    """optim names beyond AdamW: transformers' Trainer.get_optimizer_cls_and_kwargs picks class and keywords; the
    optimizer then steps exactly as that class built by hand over the same groups."""
    from types import SimpleNamespace

    from transformers import Trainer

    cfg = SFTConfig(optim=name, learning_rate=1e-3, adam_beta2=0.99)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(SimpleNamespace(
        optim=name, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, optim_args=None,
        optim_target_modules=None))
    ours, ref = _model(), _model()
    # transformers' Trainer gives the weight decay in the param groups (0.0 here), over the class's own default
    opt, ref_opt = build_optimizer(ours, cfg), cls([{"params": list(ref.parameters()), "weight_decay": 0.0}], **kwargs)
    assert type(opt) is cls and all(opt.defaults[k] == v for k, v in kwargs.items() if k in opt.defaults)
    _steps_equal(ours, opt, ref, ref_opt, 2)


def test_optimizers_fasttune_cannot_drive_are_refused():
    with pytest.raises(ConfigError, match="optim='galore_adamw' is not supported"):
        SFTConfig(optim="galore_adamw")


def test_optim_args_reach_transformers_optimizers():
    opt = build_optimizer(_model(), SFTConfig(optim="ademamix", optim_args="alpha=8.0,beta3=0.999"))
    assert opt.defaults["alpha"] == 8.0 and opt.defaults["betas"][2] == 0.999
