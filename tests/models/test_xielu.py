"""xIELU (Apertus' activation) against transformers' XIELUActivation: values and gradients, parameters included."""
import torch
from transformers.activations import XIELUActivation

from fasttune.models.xielu import XIELU


def test_values_and_grads_equal_transformers():
    ref = XIELUActivation(dtype=torch.float32)
    ours = XIELU()
    assert {n: tuple(t.shape) for n, t in ours.state_dict().items()} == \
        {n: tuple(t.shape) for n, t in ref.state_dict().items()}  # checkpoints load as they are
    with torch.no_grad():
        ref.alpha_p.fill_(0.3)
        ref.alpha_n.fill_(-0.7)
    ours.load_state_dict(ref.state_dict())
    x = torch.cat([torch.linspace(-6, 6, 101), torch.tensor([-1e-7, -1e-6, 0.0, 1e-7])]).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(ours(x), ref(x2), rtol=1e-6, atol=1e-7)
    ours(x).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for name in ("alpha_p", "alpha_n"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad, rtol=1e-5, atol=1e-6)
