"""What the GRPO tool-loop tests against TRL share: a byte tokenizer with Qwen3's chat template, the tiny model with a
long context, and both trainers with their samplers replaced by one scripted function of the context (subclass hooks,
no patching)."""
import copy
import json

G = 4  # completions per prompt
LONG = dict(max_position_embeddings=4096)  # byte tokens: the tools' schemas alone are ~700
END = "<|im_end|>"


def call(name, **arguments):
    """A Qwen3-style tool call's text."""
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def tool_tokenizer():
    """The tiny byte tokenizer with TRL's copy of Qwen3's chat template and <|im_end|> as EOS (as Qwen3's)."""
    from tiny_tokenizer import make_tiny_tokenizer
    from trl.chat_template_utils import qwen3_chat_template

    tok = make_tiny_tokenizer(qwen3_chat_template)
    tok.eos_token = END
    return tok


def tool_model(tmp_path_factory, tok):
    """(our LoRA model with random B, its tokenizer, the saved adapter's folder) on the tiny llama with LONG."""
    from peft_oracle import randomize_lora_b
    from tiny import hf_model, save_hf

    from fasttune import FastLanguageModel

    folder = tmp_path_factory.mktemp("grpo_tools") / "llama"
    save_hf(hf_model("llama", seed=0, **LONG), folder, tok)
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora_b(model)
    adapter = tmp_path_factory.mktemp("grpo_tools_adapter") / "adapter"
    model.save_pretrained(str(adapter))
    return model, tok, adapter


def scripted(turn):
    """(our GRPOTrainer, TRL's GRPOTrainer) subclasses whose sampler returns turn(tokenizer, context ids, position in
    the call) for each context, encoded."""
    import trl

    from fasttune import GRPOTrainer

    def encode(tok, ids, i):
        return tok(turn(tok.decode(ids), i), add_special_tokens=False)["input_ids"]

    class ScriptedTRL(trl.GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            return [encode(self.processing_class, ids, i) for i, ids in enumerate(prompt_ids)], None

    class Scripted(GRPOTrainer):
        def sample(self, examples, seed, model=None, max_new_tokens=None):
            out = [encode(self.tokenizer, ex["prompt_ids"], i) for i, ex in enumerate(examples)]
            return out, [self.tokenizer.eos_token_id not in c for c in out]

    return Scripted, ScriptedTRL


def config(**cfg) -> dict:
    """The shared GRPO settings: one step of two prompts' groups in one micro-batch."""
    return {"per_device_train_batch_size": 2 * G, "gradient_accumulation_steps": 1, "num_generations": G,
            "max_steps": 1, "max_grad_norm": 0.0, **cfg}


def ours(cls, model, tok, tmp_path, rows, reward_funcs, **kwargs):
    """Our trainer (cls) on rows, with config(**kwargs' cfg) and the other kwargs (tools, environment_factory)."""
    from fasttune import GRPOConfig

    cfg = kwargs.pop("cfg", {})
    return cls(model, reward_funcs=reward_funcs, processing_class=copy.deepcopy(tok), train_dataset=rows,
               args=GRPOConfig(output_dir=str(tmp_path / "ours"), shuffle=False, **config(**cfg)), **kwargs)


def our_rollout(trainer):
    """Our scored micro-batch of the first two groups."""
    return trainer.rollout([trainer.train_examples[i] for i in range(2 * G)], [2 * G], seed=0)[0]


def trl_rollout(cls, adapter, tok, tmp_path, rows, reward_funcs, **kwargs):
    """(TRL's trainer cls on the PEFT twin with our adapter, its scored batch of the rows' groups)."""
    import trl
    from datasets import Dataset
    from peft_oracle import peft_twin

    cfg = {k: v for k, v in config(**kwargs.pop("cfg", {})).items() if k not in ("max_steps", "max_grad_norm")}
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False, **cfg)
    tr = cls(model=peft_twin("llama", adapter, **LONG), reward_funcs=reward_funcs, args=args,
             train_dataset=Dataset.from_list(rows), processing_class=copy.deepcopy(tok), **kwargs)
    tr.current_gradient_accumulation_steps = 1
    # (each completion its own row dict, as TRL's dataloader gives them: a rollout_func's fields are merged into them)
    return tr, tr._generate_and_score_completions([dict(row) for row in rows for _ in range(G)])


def assert_rollouts_equal(got: dict, want: dict):
    """Our micro-batch against TRL's scored batch: prompt tokens, completion tokens, attention over the tool results,
    the loss mask without them, the advantages."""
    import torch

    width = want["prompt_ids"].shape[1]
    torch.testing.assert_close(got["input_ids"][:, :width], want["prompt_ids"])
    mask = want["completion_mask"]
    comp = got["input_ids"][:, width:]
    assert comp.shape == mask.shape
    torch.testing.assert_close(comp * mask, want["completion_ids"] * mask)
    torch.testing.assert_close(got["attention_mask"][:, width:], mask)  # attention sees the tool results
    torch.testing.assert_close(got["completion_mask"], mask * want["tool_mask"])  # the loss does not
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-6, atol=1e-6)
