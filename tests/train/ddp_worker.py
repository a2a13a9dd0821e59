"""Run by tests/train/test_distributed.py, alone or under torchrun: a few SFT steps on a tiny model. With a 4th
argument R, rank R dies (os._exit) in its third micro-batch, to test that the job ends instead of hanging."""
import faulthandler
import json
import os
import sys

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer


class DyingTrainer(SFTTrainer):
    calls = 0

    def micro_batch_loss(self, batch, num_items):
        DyingTrainer.calls += 1
        if DyingTrainer.calls == 3 and str(self.dist.rank) == os.environ.get("DIE_RANK"):
            os._exit(3)  # a crash with no cleanup, like a killed process or a failed GPU
        return super().micro_batch_loss(batch, num_items)


def main(model_dir, out_dir, grad_accum, die_rank=None):
    if die_rank is not None:
        os.environ["DIE_RANK"] = die_rank
    model, tok = FastLanguageModel.from_pretrained(model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    rows = [{"text": f"row {i} " + "abc " * (1 + i % 5)} for i in range(24)]
    args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=int(grad_accum),
                     learning_rate=1e-2, max_steps=5, save_steps=3, logging_steps=1)
    trainer = (DyingTrainer if die_rank is not None else SFTTrainer)(model=model, tokenizer=tok, train_dataset=rows,
                                                                     args=args)
    trainer.train()
    if trainer.dist.is_main:
        model.save_pretrained(f"{out_dir}/adapter")
        print(json.dumps([h["loss"] for h in trainer.log_history]))


if __name__ == "__main__":
    faulthandler.enable()  # an abort prints every thread's Python stack
    main(*sys.argv[1:])
