"""group_by_length (transformers' train_sampling_strategy="group_by_length"): each optimizer step's rows come from a
shuffled block of similar lengths, in transformers' LengthGroupedSampler order."""
import torch

from fasttune import FastLanguageModel, SFTConfig, SFTTrainer


def _trainer(folder, tmp_path, **cfg):
    model, tok = FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    texts = ["x" * int(n) for n in torch.randint(1, 60, (96,))]
    args = SFTConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=2, learning_rate=1e-3, **cfg)
    return SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"text": t} for t in texts], args=args)


def _padding(trainer, order):
    """Pad tokens over the epoch's micro-batches of 2 rows in `order`."""
    lengths = [trainer.example_tokens(trainer.train_examples[i]) for i in order]
    return sum(2 * max(pair) - sum(pair) for pair in zip(lengths[::2], lengths[1::2]))


def test_order_is_transformers_length_grouped_sampler(tiny_model_dir, tmp_path):
    """The epoch's order equals transformers' LengthGroupedSampler (step-sized batches of 4 rows) drawing from the
    shuffle's generator; blocks are sorted longest first, the longest example leads, each epoch differs, and the
    micro-batches pad far less than the random order's."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer = _trainer(tiny_model_dir("llama"), tmp_path, train_sampling_strategy="group_by_length")
    assert trainer.args.group_by_length and trainer.args.shuffle
    lengths = [trainer.example_tokens(ex) for ex in trainer.train_examples]
    for epoch in (0, 1):
        order = trainer.epoch_order(epoch)
        sampler = LengthGroupedSampler(4, lengths=lengths, generator=trainer.data_generator(epoch))
        assert order == list(sampler)
    order = trainer.epoch_order(0)
    assert sorted(order) == list(range(96)) and order != trainer.epoch_order(1)
    assert lengths[order[0]] == max(lengths)
    block = 4 * min(96 // 16, 50)  # transformers' megabatch: min(n // (4 x batch), 50) batches
    for start in range(block, 96, block):  # (the first block's head is the longest example, swapped in)
        part = [lengths[i] for i in order[start:start + block]]
        assert part == sorted(part, reverse=True)
    random_order = _trainer(tiny_model_dir("llama"), tmp_path).epoch_order(0)
    assert _padding(trainer, order) < 0.5 * _padding(trainer, random_order)


def test_training_draws_the_grouped_steps(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir("llama"), tmp_path, group_by_length=True)
    order = trainer.epoch_order(0)
    first = next(trainer.step_groups(0, 0))[2]
    assert [i for ids in first for i in ids] == order[:4]
    trainer.train()
    assert len([h for h in trainer.log_history if "loss" in h]) >= 1


def test_yaml_value():
    assert SFTConfig.from_dict({"group_by_length": "true"}, "x.yaml").group_by_length is True
