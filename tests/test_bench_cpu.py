"""The benchmark harnesses run end to end on CPU with tiny sizes: the training benchmark's Mamba-2
rows against transformers' Mamba2ForCausalLM + peft, and `bench generate` (ours bare and with
adapters active, transformers' generate with the same weights; mamba-ssm needs CUDA)."""
import importlib.util
import json

import pytest
import torch

from mambapeft.bench.common import provenance, source_digest
from mambapeft.bench.train import run_benchmarks
from mambapeft.cli import main as cli


def test_training_benchmark_runs_mamba2_rows_against_transformers(tmp_path):
    if torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm"):
        pytest.skip("transformers <5.24 sends its Mamba-2 to mamba-ssm's CUDA kernels even for CPU tensors")
    report = run_benchmarks(tmp_path, language_backbones=("mamba2-mini",), vision_methods=[],
                            language_methods=["lora_in_proj"], language_shape=(2, 32), warmup_steps=(1, 1),
                            device="cpu")
    ours = report["language"]["mamba2-mini"]["lora_in_proj"]
    assert ours["tokens_per_s"] > 0 and ours["backend"] == "torch"
    assert set(report["baselines"]) == {"hf-mamba2+peft-lora:mamba2-mini"}  # bf16 weights: CUDA only
    assert report["baselines"]["hf-mamba2+peft-lora:mamba2-mini"]["tokens_per_s"] > 0
    assert "| mamba2-mini lora_in_proj / hf-mamba2+peft-lora:mamba2-mini |" in (tmp_path / "cpu.md").read_text()
    digest = report["provenance"]["source_sha256"]
    assert digest == source_digest() and json.loads((tmp_path / "cpu.json").read_text())["provenance"]["source_sha256"] == digest
    assert f"source sha256 {digest[:16]} (`mambapeft bench source-digest`; " in (tmp_path / "cpu.md").read_text()


def _source_tree(root):
    """A package of code files (and files that are not code) and vision/, language/ method files."""
    for name, text in {"package/a.py": "x = 1\n", "package/kernels/k.cu": "// kernel\n", "package/k.cuh": "#pragma once\n",
                       "package/__pycache__/a.cpython-311.pyc": "bytecode", "package/notes.txt": "notes",
                       "checkout/vision/methods.yaml": "lora: {}\n", "checkout/language/variants.yaml": "mini: {}\n",
                       "checkout/vision/readme.md": "words"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "package", root / "checkout"


@pytest.mark.parametrize("edit, moves", [("package/a.py", True), ("package/kernels/k.cu", True),
                                         ("package/k.cuh", True), ("checkout/language/variants.yaml", True),
                                         ("package/__pycache__/a.cpython-311.pyc", False),
                                         ("package/notes.txt", False), ("checkout/vision/readme.md", False)])
def test_the_source_digest_follows_the_code_and_method_files_wherever_they_lie(tmp_path, edit, moves):
    first = source_digest(*_source_tree(tmp_path / "one"))
    assert source_digest(*_source_tree(tmp_path / "two")) == first  # the same files elsewhere
    with open(tmp_path / "two" / edit, "a") as f:
        f.write("# edited\n")
    assert (source_digest(tmp_path / "two" / "package", tmp_path / "two" / "checkout") != first) == moves


def test_provenance_names_the_commit_and_the_digest_the_cli_prints(capsys):
    source = provenance()
    assert cli(["bench", "source-digest"]) == 0
    assert capsys.readouterr().out.strip() == source["source_sha256"]
    if source["git_commit"] is not None:  # a git checkout (CI's clone is)
        assert len(source["git_commit"]) == 40 and isinstance(source["git_changed"], bool)


def test_generation_benchmark_runs_on_cpu(tmp_path):
    assert cli(["bench", "generate", "--backbones", "mamba-mini", "--batch", "1,2", "--prompt", "6", "--new", "4",
                "--repeats", "1", "--device", "cpu", "--weights-root", str(tmp_path / "none"),
                "--out", str(tmp_path)]) == 0
    entry = json.loads((tmp_path / "generate_cpu.json").read_text())["backbones"]["mamba-mini"]
    assert entry["weights"].startswith("random-init (no checkpoint at")
    for name in ("ours", "ours+affix", "ours+additional_scan", "ours+periodic", "transformers generate"):
        for batch in ("1", "2"):
            assert entry["rows"][name][batch]["tokens_per_s"] > 0, (name, entry["rows"][name][batch])
    for batch in ("1", "2"):  # the same weights, fp32: the same greedy tokens
        assert entry["rows"]["transformers generate"][batch]["token_agreement_with_ours"] == 1.0
        assert "skipped" in entry["rows"]["mamba-ssm generate(cg=True)"][batch]
    assert "| ours+periodic | 2 |" in (tmp_path / "generate_cpu.md").read_text()


def test_queued_step_timing_waits_for_the_device_around_runs_only(monkeypatch):
    """Training rows are timed as the trainer runs its steps: runs of calls queued back to back, the
    device waited for before and after each run only; one per-call time per run."""
    from mambapeft.bench import common

    order = []
    monkeypatch.setattr(common, "synchronize", lambda device: order.append("wait"))
    times = common.timed_queued_calls(lambda: order.append("call"), 20, "cuda", runs=4)
    assert len(times) == 4 and all(t >= 0 for t in times)
    assert order == (["wait"] + ["call"] * 5 + ["wait"]) * 4
