"""Weights and data fetched by the pipeline's download rules, against a stand-in Hub on 127.0.0.1
(tests/hub_server.py): fresh download, pinned revision, resume after a broken transfer, checksum
mismatches naming both hashes, the offline message, HF_TOKEN used and never recorded, and the
downloaded tiny model accepted by `backbone prepare`; LLM-Adapters' files from raw URLs and an
evaluation split exported through `datasets.load_dataset`.

Each download runs in a subprocess with its own HF_ENDPOINT, HF_HOME and offline setting
(huggingface_hub reads them once, when imported): as the rules run it (`mambapeft ...`), or, where
only the outcome matters, the fetch function itself (a CLI that fails imports torch to name the error:
seconds per call)."""
import hashlib
import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hub_server import FakeHub, git_blob_sha1, serve
from mambapeft.models import build_model
from mambapeft.models.checkpoints import save_lm

TOKEN = "hf_test_token_never_written_down"
TOKENIZER = {"repo": "EleutherAI/gpt-neox-mini", "revision": "main", "allow_patterns": ["tokenizer.json"]}


@pytest.fixture
def hub():
    fake = FakeHub()
    server = serve(fake)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mini_checkpoint(tmp_path_factory):
    """A random-weight mamba-mini in the state-spaces layout: {file name: bytes}."""
    directory = tmp_path_factory.mktemp("mamba-mini")
    save_lm(build_model("mamba-mini"), directory)
    return {name: (directory / name).read_bytes() for name in ("config.json", "pytorch_model.bin")}


FETCH = """import json, sys
from mambapeft.data import download
from mambapeft.data.errors import DataError
try:
    record = getattr(download, sys.argv[1])(*json.loads(sys.argv[2]))
except DataError as err:
    sys.exit(str(err))
with open(sys.argv[3], "w") as out:
    json.dump(record, out)
"""


def run(command, hub, tmp_path, offline=False, endpoint=None):
    env = {**os.environ, "HF_ENDPOINT": endpoint or hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": TOKEN,
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "1" if offline else "0"}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120, env=env)


def mambapeft(*args, hub, tmp_path, **kwargs):
    return run(["-m", "mambapeft.cli", *args], hub, tmp_path, **kwargs)


def fetch(function, args, out, hub, tmp_path, **kwargs):
    """``mambapeft.data.download.<function>(*args)``, its record written to ``out``; failure: exit 1, message."""
    return run(["-c", FETCH, function, json.dumps(args), str(out)], hub, tmp_path, **kwargs)


def weights_spec(tmp_path, revision="main"):
    return {"source": "official", "path": str(tmp_path / "weights" / "mamba-mini"),
            "tokenizer": str(tmp_path / "weights" / "neox"),
            "download": {"repo": "state-spaces/mamba-mini", "revision": revision,
                         "allow_patterns": ["config.json", "pytorch_model.bin"], "tokenizer": TOKENIZER}}


def download_weights(spec, hub, tmp_path, cli=False, **kwargs):
    if cli:
        return mambapeft("backbone", "download", "--backbone", "mamba-mini", "--spec", json.dumps(spec),
                         "--out", str(tmp_path / "download.json"), hub=hub, tmp_path=tmp_path, **kwargs)
    return fetch("fetch_weights", ["mamba-mini", spec], tmp_path / "download.json", hub, tmp_path, **kwargs)


def publish(hub, checkpoint):
    """The mini model's repository (plus a file the patterns leave out) and the tokenizer's."""
    hub.add_commit("EleutherAI/gpt-neox-mini", {"tokenizer.json": b'{"model": "tiny"}', "vocab.json": b"{}"})
    return hub.add_commit("state-spaces/mamba-mini", {**checkpoint, "README.md": b"# mamba-mini\n"})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_gets(hub, name):
    return [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1] and r[1].endswith(name)]


def test_fresh_download_is_recorded_and_passes_backbone_prepare(hub, mini_checkpoint, tmp_path):
    commit = publish(hub, mini_checkpoint)
    spec = weights_spec(tmp_path)
    done = download_weights(spec, hub, tmp_path, cli=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "download.json").read_text())
    weights = record["files"]["weights"]
    assert weights["status"] == "downloaded" and weights["commit"] == commit and weights["revision"] == "main"
    assert {name: entry["sha256"] for name, entry in weights["files"].items()} == {
        name: sha256(data) for name, data in mini_checkpoint.items()}
    assert sorted(p.name for p in (tmp_path / "weights" / "mamba-mini").iterdir()) == sorted(mini_checkpoint)
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["mamba-mini", "neox"]  # no staging left
    assert (tmp_path / "weights" / "neox" / "tokenizer.json").read_bytes() == b'{"model": "tiny"}'
    # HF_TOKEN reached the Hub, and nowhere else
    assert all(r[2].get("Authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert TOKEN not in (tmp_path / "download.json").read_text() + done.stdout + done.stderr

    prepared = mambapeft("backbone", "prepare", "--backbone", "mamba-mini", "--spec", json.dumps(spec),
                         "--manifest", str(tmp_path / "checkpoint.json"), hub=hub, tmp_path=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    assert manifest["checksums"] == {name: entry["sha256"] for name, entry in weights["files"].items()}

    hub.requests.clear()  # a second run checks what is in place against the Hub and downloads nothing
    again = download_weights(spec, hub, tmp_path, cli=True)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "download.json").read_text())["files"]["weights"]["status"] == "present, verified"
    assert not [r for r in hub.requests if "/resolve/" in r[1]]


def test_the_pinned_revision_is_fetched_not_the_branch(hub, mini_checkpoint, tmp_path):
    pinned = publish(hub, mini_checkpoint)
    newer = {**mini_checkpoint, "config.json": mini_checkpoint["config.json"].replace(b"48", b"64")}
    hub.add_commit("state-spaces/mamba-mini", newer)  # main moves on
    done = download_weights(weights_spec(tmp_path, revision=pinned), hub, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "weights" / "mamba-mini" / "config.json").read_bytes() == mini_checkpoint["config.json"]
    assert json.loads((tmp_path / "download.json").read_text())["files"]["weights"]["commit"] == pinned
    model_requests = [r[1] for r in hub.requests if "mamba-mini" in r[1]]
    assert model_requests and all(pinned in path for path in model_requests)


def test_a_transfer_cut_off_midway_resumes_where_it_stopped(hub, tmp_path):
    """huggingface_hub resumes from the last 10 MB chunk it wrote, so the file is larger than that."""
    large = bytes(range(256)) * 45_000  # 11.5 MB
    hub.add_commit("state-spaces/mamba-large", {"pytorch_model.bin": large})
    hub.cut["pytorch_model.bin"] = len(large) - 1_000_000
    spec = {"path": str(tmp_path / "large"), "download": {"repo": "state-spaces/mamba-large", "revision": "main",
                                                          "allow_patterns": ["pytorch_model.bin"]}}
    done = download_weights(spec, hub, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "large" / "pytorch_model.bin").read_bytes() == large
    first, second = [r[2].get("Range") for r in resolve_gets(hub, "pytorch_model.bin")]
    assert first is None and 0 < int(second.removeprefix("bytes=").removesuffix("-")) < len(large) - 1_000_000


def test_a_corrupt_download_is_rejected_naming_both_hashes_and_the_rest_is_kept(hub, mini_checkpoint, tmp_path):
    publish(hub, mini_checkpoint)
    good = mini_checkpoint["pytorch_model.bin"]
    bad = bytes(len(good))  # right size, wrong bytes: only the checksum can tell
    hub.corrupt["pytorch_model.bin"] = bad
    done = download_weights(weights_spec(tmp_path), hub, tmp_path)
    assert done.returncode == 1
    assert "pytorch_model.bin" in done.stderr and sha256(good) in done.stderr and sha256(bad) in done.stderr
    assert not (tmp_path / "weights" / "mamba-mini").exists() and not (tmp_path / "download.json").exists()

    del hub.corrupt["pytorch_model.bin"]
    hub.requests.clear()
    again = download_weights(weights_spec(tmp_path), hub, tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(resolve_gets(hub, "pytorch_model.bin")) == 1 and not resolve_gets(hub, "config.json")  # kept from run 1

    placed = tmp_path / "weights" / "mamba-mini" / "config.json"
    placed.write_bytes(b'{"d_model": 64}')  # a file in place that is not the pinned one: named, never replaced
    third = download_weights(weights_spec(tmp_path), hub, tmp_path)
    assert third.returncode == 1
    assert str(placed) in third.stderr and git_blob_sha1(mini_checkpoint["config.json"]) in third.stderr
    assert git_blob_sha1(b'{"d_model": 64}') in third.stderr and placed.read_bytes() == b'{"d_model": 64}'


def test_offline_or_unreachable_lists_what_to_put_where(hub, mini_checkpoint, tmp_path):
    publish(hub, mini_checkpoint)
    spec = weights_spec(tmp_path)
    offline = download_weights(spec, hub, tmp_path, cli=True, offline=True)
    assert offline.returncode == 2 and "Traceback" not in offline.stderr and not hub.requests  # no attempt
    message = offline.stderr
    assert "HF_HUB_OFFLINE=1 is set" in message and "snakemake --until download_weights download_data" in message
    assert f"{spec['path']}  <-  config.json, pytorch_model.bin" in message
    assert "state-spaces/mamba-mini/tree/main" in message
    assert f"{spec['tokenizer']}  <-  tokenizer.json" in message and "EleutherAI/gpt-neox-mini/tree/main" in message

    unreachable = download_weights(spec, hub, tmp_path, endpoint="http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "http://127.0.0.1:9 is unreachable" in unreachable.stderr
    assert f"{spec['path']}  <-  config.json" in unreachable.stderr

    # pre-seeded by hand: offline is fine, and the record says nothing was verified
    (tmp_path / "weights" / "mamba-mini").mkdir(parents=True)
    for name, data in mini_checkpoint.items():
        (tmp_path / "weights" / "mamba-mini" / name).write_bytes(data)
    (tmp_path / "weights" / "neox").mkdir()
    (tmp_path / "weights" / "neox" / "tokenizer.json").write_text("{}")
    seeded = download_weights(spec, hub, tmp_path, offline=True)
    assert seeded.returncode == 0, seeded.stderr
    record = json.loads((tmp_path / "download.json").read_text())["files"]["weights"]
    assert record["status"] == "present, not verified (HF_HUB_OFFLINE=1 is set)"
    assert record["files"]["pytorch_model.bin"]["sha256"] == sha256(mini_checkpoint["pytorch_model.bin"])


# --- language data: raw files at a pinned commit and a Hub dataset split ----------------------------

ARC_ROWS = [{"id": f"q{i}", "question": f"Which is number {i}?", "answerKey": "B",
             "choices": {"text": ["zero", f"number {i}", "two", "three"], "label": ["A", "B", "C", "D"]}}
            for i in range(5)]
ARC_README = b"""---
configs:
- config_name: ARC-Easy
  data_files:
  - split: test
    path: ARC-Easy/test-*
---
"""
TRAIN = json.dumps([{"instruction": "Is the sky blue?", "input": "", "output": "the answer is true",
                     "answer": "true"}] * 40).encode()


def parquet(rows) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def commonsense_spec(hub, tmp_path, checksum, dataset_revision):
    hub.raw["c0ffee/ft-training_set/commonsense_170k.json"] = TRAIN
    files = {"commonsense_170k.json": {"path": "ft-training_set/commonsense_170k.json", **checksum}}
    return {"kind": "commonsense", "source": "llm-adapters", "root": str(tmp_path / "commonsense"),
            "download": {"base_url": f"{hub.url}/raw/c0ffee", "files": files, "eval_sets": {"arc_easy": dataset_revision}}}


def download_data(spec, hub, tmp_path, **kwargs):
    return mambapeft("data", "download", "--spec", json.dumps(spec), "--out", str(tmp_path / "data.json"),
                     hub=hub, tmp_path=tmp_path, **kwargs)


def fetch_language(spec, hub, tmp_path, **kwargs):
    return fetch("fetch_language", [spec], tmp_path / "data.json", hub, tmp_path, **kwargs)


def test_language_data_from_raw_urls_and_a_hub_dataset_split_is_what_data_check_reads(hub, tmp_path):
    pinned = hub.add_commit("allenai/ai2_arc", {"README.md": ARC_README, "ARC-Easy/test-00000-of-00001.parquet":
                                                parquet(ARC_ROWS)}, kind="datasets")
    hub.add_commit("allenai/ai2_arc", {"README.md": ARC_README, "ARC-Easy/test-00000-of-00001.parquet":
                                       parquet(ARC_ROWS[:2])}, kind="datasets")  # main moves on
    spec = commonsense_spec(hub, tmp_path, {"git_sha1": git_blob_sha1(TRAIN)}, pinned)
    hub.cut["c0ffee/ft-training_set/commonsense_170k.json"] = len(TRAIN) // 3
    done = download_data(spec, hub, tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "data.json").read_text())["files"]
    assert record["commonsense_170k.json"]["sha256"] == sha256(TRAIN)
    assert record["eval/arc_easy"]["commit"] == pinned and record["eval/arc_easy"]["records"] == 5
    raw_gets = [r[2].get("Range") for r in hub.requests if r[1].endswith("commonsense_170k.json")]
    assert raw_gets == [None, f"bytes={len(TRAIN) // 3}-"]  # resumed, not started over
    root = tmp_path / "commonsense"
    assert sorted(p.name for p in root.iterdir()) == [".download", "commonsense_170k.json", "eval"]
    checked = mambapeft("data", "check", "--kind", "commonsense", str(root), "--task", "arc_easy", hub=hub,
                        tmp_path=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["tasks"]["arc_easy"] == {"test": 5, "num_choices": 4,
                                                               "file": str(root / "eval/arc_easy/test.jsonl")}


def test_a_raw_file_with_the_wrong_checksum_is_deleted_and_both_hashes_named(hub, tmp_path):
    spec = commonsense_spec(hub, tmp_path, {"sha256": "0" * 64}, "main")
    spec["download"].pop("eval_sets")
    done = fetch_language(spec, hub, tmp_path)
    assert done.returncode == 1 and "0" * 64 in done.stderr and sha256(TRAIN) in done.stderr
    assert "commonsense_170k.json" in done.stderr and not list((tmp_path / "commonsense").iterdir())

    offline = fetch_language(spec, hub, tmp_path, offline=True)
    assert offline.returncode == 1 and "HF_HUB_OFFLINE=1 is set" in offline.stderr
    assert f"{tmp_path / 'commonsense' / 'commonsense_170k.json'}  <-  {hub.url}/raw/c0ffee/" in offline.stderr


def test_offline_vtab_makes_no_attempt_either(hub, tmp_path):
    source = {"url": f"{hub.url}/raw/vtab-1k.zip"}
    done = fetch("fetch_vtab", [str(tmp_path / "vtab"), ["cifar"], source], tmp_path / "vtab.json", hub, tmp_path,
                 offline=True)
    assert done.returncode == 1 and not hub.requests
    assert "no download attempted: HF_HUB_OFFLINE=1 is set" in done.stderr and "missing tasks: cifar" in done.stderr


# --- Hub datasets of the config's `hub_datasets` table ----------------------------------------------

YELP_README = b"""---
configs:
- config_name: plain_text
  data_files:
  - split: train
    path: plain_text/train-*
  - split: test
    path: plain_text/test-*
---
"""


def yelp_files(n_train):
    """fancyzhx/yelp_polarity's layout (plus a file the patterns leave out)."""
    rows = [{"text": f"review {i} " + "word " * 300, "label": i % 2} for i in range(n_train)]
    return {"README.md": YELP_README, "plain_text/train-00000-of-00001.parquet": parquet(rows),
            "plain_text/test-00000-of-00001.parquet": parquet(rows[:3]), "notes/extra.parquet": parquet(rows[:1])}


def yelp_entry(tmp_path, revision):
    return {"repo": "fancyzhx/yelp_polarity", "revision": revision, "allow_patterns": ["plain_text/*.parquet"],
            "target": str(tmp_path / "yelp_polarity")}


def download_hub(name, entry, hub, tmp_path, **kwargs):
    return mambapeft("data", "download-hub", "--name", name, "--spec", json.dumps(entry), "--out",
                     str(tmp_path / "hub.json"), hub=hub, tmp_path=tmp_path, **kwargs)


def test_a_hub_dataset_lands_as_published_at_the_pinned_revision_and_data_check_reads_it(hub, tmp_path):
    from mambapeft.data.yelp_polarity import check_yelp_polarity

    pinned = hub.add_commit("fancyzhx/yelp_polarity", yelp_files(6), kind="datasets")
    hub.add_commit("fancyzhx/yelp_polarity", yelp_files(2), kind="datasets")  # main moves on
    done = download_hub("yelp_polarity", yelp_entry(tmp_path, pinned), hub, tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "hub.json").read_text())["files"]["yelp_polarity"]
    assert record["commit"] == pinned and record["status"] == "downloaded"
    assert sorted(record["files"]) == ["plain_text/test-00000-of-00001.parquet", "plain_text/train-00000-of-00001.parquet"]
    target = tmp_path / "yelp_polarity"
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "plain_text", "plain_text/test-00000-of-00001.parquet", "plain_text/train-00000-of-00001.parquet"]
    summary = check_yelp_polarity(target)
    assert summary["train"]["n"] == 6 and summary["test"]["n"] == 3

    hub.requests.clear()  # in place: checked against the Hub's listing, nothing downloaded
    again = download_hub("yelp_polarity", yelp_entry(tmp_path, pinned), hub, tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "hub.json").read_text())["files"]["yelp_polarity"]["status"] == "present, verified"
    assert not [r for r in hub.requests if "/resolve/" in r[1]]


GSM8K_README = b"""---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
"""


def test_a_task_familys_splits_are_exported_where_lm_eval_reads_them(hub, tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(4)]
    pinned = hub.add_commit("openai/gsm8k", {"README.md": GSM8K_README, "main/train-00000-of-00001.parquet": parquet(rows),
                                             "main/test-00000-of-00001.parquet": parquet(rows[:3])}, kind="datasets")
    entry = {"family": "lm_eval_suite", "target": str(tmp_path / "suite"), "revisions": {"gsm8k": pinned}}
    done = fetch("fetch_hub_dataset", ["lm_eval_suite", entry], tmp_path / "hub.json", hub, tmp_path)
    assert done.returncode == 0, done.stderr
    files = json.loads((tmp_path / "hub.json").read_text())["files"]
    assert files["eval/gsm8k"]["records"] == 3 and files["eval/gsm8k/train"]["records"] == 4  # scored and few-shot
    assert files["eval/gsm8k"]["commit"] == pinned
    lines = (tmp_path / "suite" / "eval" / "gsm8k" / "test.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows[:3]


def test_offline_a_hub_dataset_is_named_with_where_it_goes(hub, tmp_path):
    entry = yelp_entry(tmp_path, "main")
    offline = fetch("fetch_hub_dataset", ["yelp_polarity", entry], tmp_path / "hub.json", hub, tmp_path, offline=True)
    assert offline.returncode == 1 and not hub.requests and "HF_HUB_OFFLINE=1 is set" in offline.stderr
    assert "download_hub_dataset" in offline.stderr
    assert (f"{entry['target']}  <-  plain_text/*.parquet (into this directory)  from "
            f"{hub.url}/datasets/fancyzhx/yelp_polarity/tree/main") in offline.stderr


def test_jobs_reading_a_path_wait_for_the_hub_datasets_landing_there_or_around_it():
    from mambapeft.runspec import hub_downloads_for

    config = {"resources_dir": "res", "hub_datasets": {
        "yelp": {"target": "res/yelp", "repo": "r"}, "wikitext": {"target": "res/wikitext", "repo": "r"},
        "suite": {"target": "res/suite", "family": "lm_eval_suite", "revisions": {}}}}
    assert hub_downloads_for(config, "res/yelp") == ["res/downloads/yelp.json"]
    assert hub_downloads_for(config, "res/wikitext/wikitext-2-raw-v1/test.parquet") == ["res/downloads/wikitext.json"]
    assert hub_downloads_for(config, "res") == [f"res/downloads/{n}.json" for n in ("yelp", "wikitext", "suite")]
    assert hub_downloads_for(config, "res/yelpish") == [] and hub_downloads_for({}, "res/yelp") == []
