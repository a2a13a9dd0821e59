"""The gated delta rule (models/delta_rule.py) against transformers' torch references (Qwen3-Next's token-by-token
recurrence and chunked form), and its packed-run and decode-step forms."""
import pytest
import torch
from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                torch_recurrent_gated_delta_rule)

from fasttune.models.delta_rule import chunked_delta_rule, delta_rule_step, gated_delta_rule


def _grouped(q, k, v, g, beta):
    """The inputs with q/k repeated to the value heads (each key head's consecutive value heads): transformers'
    references take grouped heads only in recent versions."""
    group = v.shape[2] // k.shape[2]
    return q.repeat_interleave(group, 2), k.repeat_interleave(group, 2), v, g, beta


def _inputs(b=2, t=150, hk=2, hv=4, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, hk, dk, generator=g), torch.randn(b, t, hk, dk, generator=g)
    v = torch.randn(b, t, hv, dv, generator=g)
    decay = -torch.rand(b, t, hv, generator=g)  # log-decay in (-1, 0]
    beta = torch.rand(b, t, hv, generator=g)
    return q, k, v, decay, beta


@pytest.mark.parametrize("t", [1, 64, 150])
def test_chunked_equals_the_recurrence(t):
    """Across whole chunks, a partial last chunk and one position; grouped value heads (4 value heads, 2 key heads);
    the final state too."""
    args = _inputs(t=t)
    ref, ref_state = torch_recurrent_gated_delta_rule(*_grouped(*args), output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
    chunk_ref, _ = torch_chunk_gated_delta_rule(*_grouped(*args), output_final_state=True, use_qk_l2norm_in_kernel=True)
    got, state = chunked_delta_rule(*args, final_state=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got, chunk_ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=2e-6)


def test_initial_state_continues_a_sequence():
    """Running 150 positions equals running 100 and then 50 from the state the first part left."""
    q, k, v, g, beta = _inputs()
    whole, _ = chunked_delta_rule(q, k, v, g, beta)
    first, state = chunked_delta_rule(*(x[:, :100] for x in (q, k, v, g, beta)), final_state=True)
    second, _ = chunked_delta_rule(*(x[:, 100:] for x in (q, k, v, g, beta)), initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-5, atol=2e-6)


def test_steps_equal_the_recurrence_and_update_the_state_in_place():
    q, k, v, g, beta = _inputs(t=20)
    ref, ref_state = torch_recurrent_gated_delta_rule(*_grouped(q, k, v, g, beta), output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
    state = torch.zeros(2, 4, 16, 8)
    out = [delta_rule_step(*(x[:, i:i + 1] for x in (q, k, v, g, beta)), state) for i in range(20)]
    torch.testing.assert_close(torch.cat(out, dim=1), ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=2e-6)


def test_spans_run_each_run_from_a_zero_state():
    """Packed runs (one chunked pass, each run moved to a chunk start, the state zeroed there): each (row, start,
    end) is its own sequence; a run's outputs and gradients equal it run alone, runs longer than a chunk too."""
    inputs = [x.requires_grad_() for x in _inputs(t=150)]
    spans = [(0, 0, 30), (0, 30, 100), (0, 100, 150), (1, 0, 70), (1, 70, 150)]
    got, _ = gated_delta_rule(*inputs, spans)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, inputs, grad)
    want = torch.zeros_like(got)
    want_grads = [torch.zeros_like(x) for x in inputs]
    for row, start, end in spans:
        part = [x.detach()[row:row + 1, start:end].requires_grad_() for x in inputs]
        alone, _ = chunked_delta_rule(*part)
        want[row:row + 1, start:end] = alone.detach()
        for total, x_grad in zip(want_grads, torch.autograd.grad(alone, part, grad[row:row + 1, start:end])):
            total[row:row + 1, start:end] = x_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    whole, _ = gated_delta_rule(*inputs)
    assert not torch.allclose(got[0, 30:], whole[0, 30:], atol=1e-3)  # the second run does not see the first

