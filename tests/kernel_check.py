"""Kernel-vs-reference criterion: our error against fp64 is no worse than the torch reference's, plus a margin."""
import torch

MARGIN = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x.double() - exact).norm() / exact.norm().clamp_min(1e-30))


def assert_as_good_as_reference(ours, ref, exact, dtype, what=""):
    e_ours, e_ref = rel_err(ours, exact), rel_err(ref, exact)
    assert torch.isfinite(ours).all(), f"{what}: non-finite output"
    assert e_ours <= e_ref + MARGIN[dtype], f"{what}: ours {e_ours:.2e} vs reference {e_ref:.2e} ({dtype})"


def run_with_grads(fn, inputs, grad_out):
    """Outputs and input gradients of fn(*inputs) for a given output gradient."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves if x.is_floating_point()]


def dtypes_for_device():
    if torch.cuda.is_available():
        return "cuda", [torch.float32, torch.bfloat16, torch.float16]
    return "cpu", [torch.float32, torch.float16]  # the interpreter's bf16 arithmetic is wrong: GPU only
