"""LLM-Adapters instruction data (commonsense_170k, math_10k): prompt, records, split, tokenisation.

Mirrors `finetune.py` of LLM-Adapters as used by MambaPEFT's language code: the Alpaca-style
template with its literal 16-space indentation and trailing spaces, a 2,000-record validation split
with seed 42, truncation to 256 tokens, eos appended when room is left, and the loss on the whole
prompt (train_on_inputs=True, so labels = input_ids).
"""

import json
from pathlib import Path

import numpy as np

from mambapeft.data.errors import DataError

# Byte-exact copies of LLM-Adapters' f-strings: the indentation and the trailing space(s) after
# "request." are part of what the model was trained on.
_INDENT = " " * 16
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
    f"{_INDENT}### Input:\n{_INDENT}{{input}}\n{_INDENT}\n"
    f"{_INDENT}### Response:\n{_INDENT}{{output}}"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.  \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n"
    f"{_INDENT}### Response:\n{_INDENT}{{output}}"
)
RECORD_FIELDS = ("instruction", "input", "output", "answer")


def generate_prompt(instruction: str, input: str | None = None, output: str = "") -> str:
    """The training prompt; with `output=""` it is the generation prompt (ending after 'Response:')."""
    # LLM-Adapters tests `if data_point["input"]`, so an empty string means "no input".
    template = PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input, output=output)


def read_instruct_json(path: str | Path) -> list[dict]:
    """Read a JSON list of {instruction, input, output, answer} records (LLM-Adapters format).

    `input` may be missing or null (read as ""); `answer` may be missing in training files (read as "").
    `output` is required: it is the response trained on (LLM-Adapters' eval files carry it too, some as "").
    Every field must be a string (numbers in `answer` are accepted and turned into strings).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: instruction file not found; write it with mambapeft.data.mini_text or download it from LLM-Adapters")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); it must be a JSON list of records") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of {{instruction, input, output, answer}} records")
    return [_validated_record(record, path, index) for index, record in enumerate(records)]


def _validated_record(record, path: Path, index: int) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {index} is {type(record).__name__}, not an object with {list(RECORD_FIELDS)}")
    if not isinstance(record.get("instruction"), str) or not record["instruction"].strip():
        raise DataError(f"{path}: record {index} has no non-empty string 'instruction'; every record needs one")
    if record.get("output") is None:  # read as "", training would silently learn an empty response
        raise DataError(f"{path}: record {index} has no 'output' field, the response trained on (eval files may "
                        "give \"\"); add it or drop the record")
    clean = {"instruction": record["instruction"]}
    for field in RECORD_FIELDS[1:]:
        value = record.get(field)
        if value is None:
            value = ""
        if field == "answer" and isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f"{path}: record {index} field '{field}' is {type(value).__name__}; it must be a string")
        clean[field] = value
    return clean


def split_train_val(records: list, val_size: int, seed: int) -> tuple[list, list]:
    """Hold out `val_size` records, as HF `Dataset.train_test_split(test_size=val_size, seed=seed)` does.

    Same permutation (`np.random.default_rng(seed).permutation(n)`, first `val_size` are validation),
    so with seed 42 the split is the original's. val_size 0 gives an empty validation list.
    """
    if not 0 <= val_size < len(records):
        raise DataError(f"val_size={val_size} must be in [0, {len(records)}) for {len(records)} records; lower it")
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order[val_size:]], [records[i] for i in order[:val_size]]


def tokenize_example(tokenizer, record: dict, cutoff_len: int = 256) -> dict[str, list[int]]:
    """Token ids of the full training prompt, truncated to `cutoff_len`; eos appended if absent and room is left.

    `labels` equals `input_ids` (train_on_inputs=True); the collator pads labels with -100.
    """
    prompt = generate_prompt(record["instruction"], record.get("input"), record["output"])
    input_ids = tokenizer.encode(prompt)[:cutoff_len]
    if (not input_ids or input_ids[-1] != tokenizer.eos_id) and len(input_ids) < cutoff_len:
        input_ids.append(tokenizer.eos_id)
    return {"input_ids": input_ids, "labels": list(input_ids)}
