"""Answer extraction and scoring for the math tasks, as LLM-Adapters' `evaluate.py` does it.

Numeric tasks (GSM8K, SVAMP, MAWPS, AddSub, SingleEq, MultiArith): the last number in the
generated text after removing commas; correct when |prediction - label| <= 0.001. AQuA: the first
capital letter A-E anywhere in the text; correct when it equals the label letter.
"""

import math
import re

from mambapeft.data.errors import DataError

ANSWER_KINDS = ("number", "letter")
NUMBER_TOLERANCE = 0.001

# The original pattern: an optional minus, digits, an optional point and more digits ("4." counts as 4).
_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"A|B|C|D|E")


def extract_answer(text: str, kind: str) -> float | str:
    """The predicted answer in `text`: a float (inf when there is no number) or a letter ('' when none)."""
    if kind == "number":
        numbers = _NUMBER.findall(text.replace(",", ""))
        return float(numbers[-1]) if numbers else math.inf
    if kind == "letter":
        letters = _LETTER.findall(text.strip())
        return letters[0] if letters else ""
    raise _unknown_kind(kind)


def is_correct(pred: float | str, label: float | str, kind: str) -> bool:
    """Whether an extracted prediction matches the label (labels may be strings such as '15.0')."""
    if kind == "number":
        return abs(float(label) - float(pred)) <= NUMBER_TOLERANCE
    if kind == "letter":
        return pred == str(label).strip()
    raise _unknown_kind(kind)


def _unknown_kind(kind: str) -> DataError:
    return DataError(f"unknown answer kind '{kind}'; use one of {', '.join(ANSWER_KINDS)} (language/tasks.yaml `answer`)")
