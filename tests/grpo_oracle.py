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
