"""What the GRPO tests against TRL share: the prompts, fixed completions and a reward function, and TRL's trainer
with its sampler replaced by those completions (a subclass hook, no patching)."""

G = 4  # completions per prompt
ROWS = [{"prompt": "add: 1+1", "answer": "ab"}, {"prompt": "x", "answer": "b"}]
# Fixed completions (byte ids; 256 = <|endoftext|>, the stop token): different lengths, some hit the answer.
COMPLETIONS = [[97, 98, 256], [97, 256], [98, 98, 98, 97, 256], [99, 100, 101, 102, 103],
               [98, 256], [97, 98, 256], [98, 256], [120, 121, 256]]


def count_a(prompts, completions, **_):
    return [float((c if isinstance(c, str) else c[-1]["content"]).count("a")) for c in completions]


def fixed_completions_trl():
    """TRL's GRPOTrainer subclass that samples COMPLETIONS (the first len(prompt_ids) of them)."""
    import trl

    class FixedCompletionsTRL(trl.GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            return [list(c) for c in COMPLETIONS[:len(prompt_ids)]], None

    return FixedCompletionsTRL


CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def assert_step_equals_trl(model, ours, batch: dict, num_items: int, theirs, inputs: dict, metrics=(),
                           clipped: str | None = "clip_ratio/region_mean", clip_metrics=CLIP_METRICS):
    """One micro-batch's loss and LoRA gradients of our GRPO/RLOO trainer equal TRL's _compute_loss on its inputs,
    clipping acted (the metric `clipped` > 0; None: not checked), and the clip metrics (plus `metrics`, e.g. "kl")
    equal TRL's."""
    import pytest
    import torch
    from peft_oracle import peft_grads

    model.zero_grad(set_to_none=True)
    loss, _ = ours.micro_batch_loss(batch, num_items)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    want_loss = theirs._compute_loss(theirs.model, inputs)
    want_loss.backward()
    want = peft_grads(theirs.model)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
    assert set(got) == set(want) and len(got) > 0
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    if clipped is not None:
        assert float(ours._ratios[clipped][-1][0]) > 0  # clipping happened
    m = theirs._metrics["train"]
    for name in (*clip_metrics, *metrics):
        s, n = ours._ratios[name][-1]  # this micro-batch's (sum, count)
        assert float(s / n) == pytest.approx(m[name][-1], rel=1e-5, abs=1e-7), name
