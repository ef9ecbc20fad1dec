"""The dt_init study's data: the offline stand-in corpora read through `datasets`, local copies in
every supported format, and the tokenized cache (a memory-mapped token array) read back."""
import json

import numpy as np
import pytest

from mambapeft.data.errors import DataError
from mambapeft.data.standin_text import TEST_FILE, TOKENIZER_FILE, TRAIN_FILE, write_standin
from mambapeft.data.text_corpus import iter_texts
from mambapeft.data.token_cache import load_tokens, token_dtype, tokenize_corpus
from mambapeft.data.tokenizer import load_tokenizer
from mambapeft.io import CorruptFileError

# a core dependency (installed wherever the package is); absent only on a bare GPU machine that runs
# `pytest -m gpu tests` from a working tree, which then collects the rest instead of stopping here
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    write_standin(root, root / "manifest.json", seed=0, n_train_docs=60, n_test_docs=10, vocab_size=300)
    return root


def texts(entry):
    return [text for batch in iter_texts(entry, batch_size=7) for text in batch]


def test_standin_loads_through_datasets_in_the_hubs_parquet_layout(standin):
    train = datasets.load_dataset("parquet", data_files=str(standin / TRAIN_FILE), split="train", streaming=True)
    documents = [row["text"] for row in train]
    assert len(documents) == 60 and all(isinstance(d, str) and d for d in documents)
    rows = texts({"path": str(standin / "wikitext-2-raw-v1"), "format": "parquet"})
    assert rows[:3] == ["", " = Notes 1 = \n", ""]  # WikiText raw: empty rows around a heading
    paragraphs = [r for r in rows if r and not r.startswith(" = ")]
    assert len(paragraphs) == 10 and all(p.startswith(" ") and p.endswith(" \n") for p in paragraphs)
    assert " ." in paragraphs[0] and ". " not in paragraphs[0].replace(" . ", "")  # punctuation split off
    manifest = json.loads((standin / "manifest.json").read_text())
    assert set(manifest["checksums"]) == {TRAIN_FILE, TEST_FILE, TOKENIZER_FILE}
    assert load_tokenizer(standin / TOKENIZER_FILE).vocab_size == 300


def test_documents_cache_round_trips(standin, tmp_path):
    entry = {"path": str(standin / "openwebtext"), "format": "parquet"}
    tokenizer = load_tokenizer(standin / TOKENIZER_FILE)
    record = tokenize_corpus(entry, standin / TOKENIZER_FILE, "documents", tmp_path / "train.bin", tmp_path / "train.json")
    tokens, meta = load_tokens(tmp_path / "train.json")
    expected = [token for text in texts(entry) for token in tokenizer.encode(text) + [tokenizer.eos_id]]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert meta == json.loads(json.dumps(record)) and meta["n_documents"] == 60 and meta["n_tokens"] == len(expected)
    assert isinstance(tokens, np.memmap)


def test_joined_cache_is_the_guides_joined_text_with_its_word_count(standin, tmp_path):
    entry = {"path": str(standin / TEST_FILE), "format": "parquet"}
    tokenizer = load_tokenizer(standin / TOKENIZER_FILE)
    tokenize_corpus(entry, standin / TOKENIZER_FILE, "joined", tmp_path / "test.bin", tmp_path / "test.json")
    tokens, meta = load_tokens(tmp_path / "test.json")
    joined = "\n\n".join(texts(entry))
    assert tokens.tolist() == tokenizer.encode(joined)
    assert meta["n_words"] == len(joined.split()) and meta["layout"] == "joined"


def test_every_local_format_reads_the_same_texts(tmp_path):
    rows = ["first document", "", "third one"]
    dataset = datasets.Dataset.from_dict({"text": rows, "id": [1, 2, 3]})
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "arrow"))
    dataset.to_json(str(tmp_path / "json" / "part.jsonl"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("\n".join(rows) + "\n")
    assert texts({"path": str(tmp_path / "arrow"), "format": "arrow", "split": "test"}) == rows
    assert texts({"path": str(tmp_path / "json"), "format": "json"}) == rows
    assert texts({"path": str(tmp_path / "text" / "*.txt"), "format": "text"}) == rows


def test_missing_or_wrong_copies_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'owt'}: no parquet files there"):
        texts({"path": str(tmp_path / "owt"), "format": "parquet"})
    with pytest.raises(DataError, match="save_to_disk"):
        texts({"path": str(tmp_path / "nothing"), "format": "arrow"})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="splits train; set the corpus's `split`"):
        texts({"path": str(tmp_path / "dd"), "format": "arrow", "split": "test"})
    with pytest.raises(DataError, match="no column 'text' \\(columns: body\\)"):
        texts({"path": str(tmp_path / "dd"), "format": "arrow", "split": "train"})


def test_a_truncated_token_array_is_refused(standin, tmp_path):
    entry = {"path": str(standin / TEST_FILE), "format": "parquet"}
    tokenize_corpus(entry, standin / TOKENIZER_FILE, "joined", tmp_path / "t.bin", tmp_path / "t.json")
    (tmp_path / "t.bin").write_bytes((tmp_path / "t.bin").read_bytes()[:-2])
    with pytest.raises(CorruptFileError, match="t.bin holds .* bytes, not the"):
        load_tokens(tmp_path / "t.json")
    assert token_dtype(50277) == np.uint16 and token_dtype(1 << 17) == np.uint32
