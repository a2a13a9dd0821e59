import numpy as np
import pytest

from fasttune.data.responses_only import derive_parts, find_all, masked_labels, response_targets
from fasttune.data.templates import CHAT_TEMPLATES
from fasttune.errors import ConfigError
from tiny_tokenizer import make_tiny_tokenizer

# 8 opens a user turn, 9 an assistant turn (two-token parts: 7 8 and 7 9).
INST, RESP = [7, 8], [7, 9]


def test_targets_run_from_each_response_part_to_the_next_instruction_part():
    ids = [1, 7, 8, 2, 7, 9, 3, 4, 7, 8, 5, 7, 9, 6]
    target, found_response, found_instruction = response_targets(ids, INST, RESP)
    assert np.flatnonzero(target).tolist() == [6, 7, 13]
    assert found_response and found_instruction
    assert masked_labels(ids, target) == [-100] * 6 + [3, 4] + [-100] * 5 + [6]


def test_packed_documents_end_their_spans():
    ids = [7, 9, 3, 4, 7, 9, 5]  # two documents: [7 9 3 4] and [7 9 5]; the first span stops at its end
    target, _, found_instruction = response_targets(ids, INST, RESP, doc_lengths=[4, 3])
    assert np.flatnonzero(target).tolist() == [2, 3, 6] and not found_instruction
    assert masked_labels([-100, 9, 3, -100, -100, 9, 5], target) == [-100, -100, 3, -100, -100, -100, 5]


def test_find_all():
    assert find_all(np.array([7, 9, 7, 9, 7]), [7, 9]) == [0, 2]
    assert find_all(np.array([7]), [7, 9]) == []


@pytest.mark.parametrize("name, instruction, response", [
    ("chatml", "<|im_start|>user", "<|im_start|>assistant\n"),
    ("llama-3", "<|start_header_id|>user<|end_header_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("gemma", "<start_of_turn>user", "<start_of_turn>model\n"),
    ("mistral", "[INST]", "[/INST]"),
    ("phi-4", "<|im_start|>user<|im_sep|>", "<|im_start|>assistant<|im_sep|>"),
    ("alpaca", "### Instruction:", "### Response:\n"),
    ("vicuna", "USER:", "ASSISTANT:"),
    ("unsloth", ">>> User:", ">>> Assistant: "),
])
def test_derive_parts_from_templates(name, instruction, response):
    tok = make_tiny_tokenizer(chat_template=None)
    tok.bos_token = "<|endoftext|>"
    assert derive_parts(tok, CHAT_TEMPLATES[name]) == (instruction, response)


def test_derive_parts_needs_a_template():
    with pytest.raises(ConfigError, match="instruction_part and response_part"):
        derive_parts(make_tiny_tokenizer(chat_template=None))
