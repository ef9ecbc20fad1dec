"""Mini byte-level BPE: build, save as a GPT-NeoX-style tokenizer.json, load, round trip."""

import json

import pytest

from mambapeft.data.errors import DataError
from mambapeft.data.instruct import generate_prompt
from mambapeft.data.tokenizer import build_tokenizer, load_tokenizer

TEXTS = [
    "Tom has 3 apples. He buys 4 more apples. Now Tom has 7 apples.",
    "The red ball is in the garden. A ball is a toy.",
    "Mia asked if the cat is small. Sam said no, the cat is big.",
] * 40


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    build_tokenizer(TEXTS, vocab_size=400, path=directory)
    return directory


def test_file_has_the_gpt_neox_layout(tokenizer_dir):
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE"
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["decoder"]["type"] == "ByteLevel"
    assert spec["normalizer"]["type"] == "NFC"
    assert spec["added_tokens"][0]["id"] == 0 and spec["added_tokens"][0]["content"] == "<|endoftext|>"


def test_round_trip_and_special_ids(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer.eos_id == 0 and tokenizer.pad_id == 0
    assert 258 < tokenizer.vocab_size <= 400
    for text in (*TEXTS[:3], "Unseen wörds, digits 12345 and\n\ttabs", generate_prompt("What colour is it?", "", "red")):
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode([*tokenizer.encode("a"), 0]) == "a"
    assert tokenizer.decode([0], skip_special_tokens=False) == "<|endoftext|>"
    assert 0 not in tokenizer.encode("Tom has 3 apples.")  # no special tokens are added


def test_template_is_compact(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir / "tokenizer.json")
    skeleton = generate_prompt("", None, "")
    assert len(tokenizer.encode(skeleton)) < len(skeleton) / 6


def test_same_texts_give_the_same_file(tokenizer_dir, tmp_path):
    build_tokenizer(TEXTS, vocab_size=400, path=tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="tokenizer.json: tokenizer not found.*gpt-neox-20b"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer.json: cannot read tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="vocab_size=100 is too small"):
        build_tokenizer(TEXTS, vocab_size=100, path=tmp_path / "t.json")


def test_loads_the_older_gpt_neox_file_format(tokenizer_dir, tmp_path):
    """GPT-NeoX-20B's tokenizer.json predates `use_regex` and stores merges as 'a b' strings."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    for part in ("pre_tokenizer", "post_processor", "decoder"):
        spec[part] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    for key in ("byte_fallback", "ignore_merges"):
        spec["model"].pop(key, None)
    spec["model"]["merges"] = [" ".join(pair) if isinstance(pair, list) else pair for pair in spec["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    neox_style, ours = load_tokenizer(tmp_path), load_tokenizer(tokenizer_dir)
    text = generate_prompt("Tom has 3 apples.", None, "the correct answer is true")
    assert neox_style.encode(text) == ours.encode(text) and neox_style.eos_id == 0
