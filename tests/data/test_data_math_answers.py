"""LLM-Adapters answer extraction: last number (commas stripped) or first A-E letter."""

import math

import pytest

from mambapeft.data.errors import DataError
from mambapeft.data.math_answers import extract_answer, is_correct


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7 - 3 = 4 crayons. The answer is 4.", 4.0),
        ("He paid 1,200 dollars, then 1,234,567.5 more", 1234567.5),
        ("The temperature fell to -15 degrees.", -15.0),
        ("3 + 6.8 = 9.8", 9.8),
        ("so 0.5 of it", 0.5),
        ("The answer is 12.", 12.0),
        ("no digits here", math.inf),
    ],
)
def test_numbers_take_the_last_one(text, expected):
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize(
    "text, expected",
    [("The answer is (D).", "D"), ("Then C and A look right", "C"), ("answer: e", ""), ("  B", "B")],
)
def test_letters_take_the_first_capital_a_to_e(text, expected):
    assert extract_answer(text, "letter") == expected


def test_is_correct_uses_the_original_tolerance():
    assert is_correct(15.0, "15.0", "number") and is_correct(9.8005, "9.8", "number")
    assert not is_correct(9.802, "9.8", "number") and not is_correct(math.inf, "3", "number")
    assert is_correct("C", "C", "letter") and not is_correct("", "C", "letter")


def test_unknown_kind_is_a_data_error():
    with pytest.raises(DataError, match="unknown answer kind 'float'"):
        extract_answer("1", "float")
    with pytest.raises(DataError, match="unknown answer kind 'float'"):
        is_correct(1.0, "1", "float")
