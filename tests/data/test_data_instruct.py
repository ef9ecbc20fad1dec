"""LLM-Adapters instruction format: exact template, record reading, split, tokenisation."""

import json

import numpy as np
import pytest

from mambapeft.data import instruct
from mambapeft.data.errors import DataError

# Copied from the reference notes (official_mambapeft.md 6.1), which quote LLM-Adapters' finetune.py.
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n                ### Instruction:\n"
    "                Add.\n                \n                ### Input:\n                2 and 3\n"
    "                \n                ### Response:\n                5"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  "
    "\n\n                ### Instruction:\n                Add 2 and 3.\n                \n"
    "                ### Response:\n                5"
)


def test_prompt_templates_are_byte_exact():
    assert instruct.generate_prompt("Add.", "2 and 3", "5") == WITH_INPUT
    assert instruct.generate_prompt("Add 2 and 3.", None, "5") == NO_INPUT
    assert instruct.generate_prompt("Add 2 and 3.", "", "5") == NO_INPUT  # empty input counts as none


def test_generation_prompt_ends_after_response_header():
    assert instruct.generate_prompt("Q").endswith("### Response:\n                ")


def test_braces_in_records_are_kept_literally():
    assert "{x}" in instruct.generate_prompt("Solve {x}", None, "{y}")


def _write(tmp_path, payload) -> str:
    path = tmp_path / "train.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_read_instruct_json_fills_missing_optional_fields(tmp_path):
    path = _write(tmp_path, [{"instruction": "a", "output": "b", "answer": 3}, {"instruction": "c", "input": None, "output": "d"}])
    assert instruct.read_instruct_json(path) == [
        {"instruction": "a", "input": "", "output": "b", "answer": "3"},
        {"instruction": "c", "input": "", "output": "d", "answer": ""},
    ]


@pytest.mark.parametrize(
    "payload, message",
    [
        ("[{", "not valid JSON"),
        ({"instruction": "a"}, "expected a non-empty JSON list"),
        ([], "expected a non-empty JSON list"),
        ([{"instruction": "a", "output": "b"}, "text"], "record 1 is str"),
        ([{"instruction": "a", "output": "b"}, {"output": "b"}], "record 1 has no non-empty string 'instruction'"),
        ([{"instruction": "a", "output": ["b"]}], "record 0 field 'output' is list"),
    ],
)
def test_malformed_instruction_files_name_file_and_record(tmp_path, payload, message):
    path = _write(tmp_path, payload)
    with pytest.raises(DataError, match=f"{path}: {message}"):
        instruct.read_instruct_json(path)


def test_split_train_val_matches_hf_train_test_split_and_is_deterministic():
    records = list(range(50))
    train, val = instruct.split_train_val(records, 10, 42)
    permutation = np.random.default_rng(42).permutation(50)  # what datasets' train_test_split draws
    assert val == permutation[:10].tolist() and train == permutation[10:].tolist()
    assert instruct.split_train_val(records, 10, 42) == (train, val)
    assert instruct.split_train_val(records, 10, 1) != (train, val)
    with pytest.raises(DataError, match="val_size=50"):
        instruct.split_train_val(records, 50, 42)


class CharTokenizer:
    """One token per character; eos = 0."""

    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]


RECORD = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "answer": "5"}


def test_tokenize_appends_eos_when_there_is_room():
    prompt_ids = CharTokenizer().encode(instruct.generate_prompt("Add 2 and 3.", None, "5"))
    out = instruct.tokenize_example(CharTokenizer(), RECORD, cutoff_len=1000)
    assert out["input_ids"] == prompt_ids + [0]
    assert out["labels"] == out["input_ids"] and out["labels"] is not out["input_ids"]


def test_tokenize_truncates_without_eos_at_the_cutoff():
    full = len(instruct.generate_prompt("Add 2 and 3.", None, "5"))
    assert len(instruct.tokenize_example(CharTokenizer(), RECORD, cutoff_len=20)["input_ids"]) == 20
    exactly = instruct.tokenize_example(CharTokenizer(), RECORD, cutoff_len=full)["input_ids"]
    assert len(exactly) == full and exactly[-1] != 0
    assert instruct.tokenize_example(CharTokenizer(), RECORD, cutoff_len=full + 1)["input_ids"][-1] == 0
