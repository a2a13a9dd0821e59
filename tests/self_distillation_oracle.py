"""What the SDFT and SDPO tests against TRL share: TRL's trainer whose sampler gives grpo_oracle's COMPLETIONS (a
subclass hook, no patching), both trainers built on our adapter and its PEFT twin, and one micro-batch's loss and
LoRA gradients on both sides."""
import copy

import torch
from grpo_oracle import COMPLETIONS
from peft_oracle import peft_grads, peft_twin
from preference_oracle import restored, shift_policy


def both(policy, tmp_path, ours_cls, ours_cfg, trl_cls, trl_cfg, rows, group: int, **cfg):
    """(ours_cls trainer, trl_cls trainer whose completions are COMPLETIONS in order) on `rows`, each micro-batch all
    of COMPLETIONS, `group` completions a prompt; `cfg` for both configs (reward_funcs=... goes to both trainers)."""
    from datasets import Dataset

    model, tok, root = policy
    extra = {"reward_funcs": cfg.pop("reward_funcs")} if "reward_funcs" in cfg else {}

    class FixedCompletions(trl_cls):
        def _generate(self, prompt_ids):
            return prompt_ids, [list(c) for c in COMPLETIONS[:len(prompt_ids)]]

    common = dict(per_device_train_batch_size=len(COMPLETIONS), gradient_accumulation_steps=1, num_generations=group,
                  max_completion_length=5, learning_rate=1e-3, **cfg)
    ours = ours_cls(model, processing_class=tok, train_dataset=rows, **extra,
                    args=ours_cfg(output_dir=str(tmp_path / "ours"), shuffle=False, **common))
    theirs = FixedCompletions(model=peft_twin("llama", root / "adapter"), processing_class=copy.deepcopy(tok),
                              train_dataset=Dataset.from_list(rows), **extra,
                              args=trl_cfg(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none",
                                           bf16=False, gradient_checkpointing=False, **common))
    theirs.current_gradient_accumulation_steps = 1  # (set by its training loop, which these tests do not run)
    return ours, theirs


def one_step_both(model, ours, theirs, rows, group: int, reused: bool, check=None):
    """One micro-batch of all COMPLETIONS on both sides, the policy moved away from its starting adapter (after
    sampling when `reused`, so that importance ratios act): (our loss, our LoRA grads, TRL's loss, TRL's grads);
    check(batch, inputs) runs on both sides' batches first. The model is restored afterwards."""
    with restored(model):
        if not reused:
            shift_policy(model, theirs.model)
        batch = ours.score(ours.train_examples, COMPLETIONS, [256 not in c for c in COMPLETIONS],
                           [len(COMPLETIONS)])[0]
        inputs = theirs._prepare_training_batch([dict(r) for r in rows for _ in range(group)])
        if check is not None:
            check(batch, inputs)
        if reused:
            assert "old_logps" in batch and "old_per_token_logps" in inputs
            shift_policy(model, theirs.model)
        model.zero_grad(set_to_none=True)
        loss, _ = ours.micro_batch_loss(batch, ours.count_items(batch))
        loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        theirs.model.train()
        want_loss = theirs.compute_loss(theirs.model, inputs)
        want_loss.backward()
        want = peft_grads(theirs.model)
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-5, atol=1e-7)
    assert abs(float(loss.detach())) > 1e-5 and set(got) == set(want) and len(got) > 0
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
