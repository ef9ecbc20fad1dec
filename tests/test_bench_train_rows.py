"""`bench train`'s rows beside the measured steps: model FLOP utilisation of the LM rows, the timm
ViT-S baselines (eager and graphed) and their ratios; the timm steps themselves on a GPU."""
import importlib.util
import json

import pytest
import torch

from mambapeft.bench.train import (
    GRAPHED,
    TIMM_BASELINE,
    add_flop_utilisation,
    bench_language_method,
    bench_timm_vit_lora,
    markdown,
    peak_bf16_flops,
    project_vtab_hours,
    timm_lora_step,
)

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm (pip install timm)")


def test_flop_utilisation_is_six_n_tokens_over_the_dense_peak():
    assert peak_bf16_flops("NVIDIA H200") == 989e12 and peak_bf16_flops("cpu") is None
    model = torch.nn.Sequential(torch.nn.Embedding(7, 10), torch.nn.Linear(10, 7, bias=False))
    model[1].weight = model[0].weight  # tied: one matrix, counted once
    row = add_flop_utilisation({"tokens_per_s": 1e9}, model, "NVIDIA H200")
    assert row["model_params"] == 70 and row["mfu"] == pytest.approx(1e9 * 6 * 70 / 989e12)
    assert "mfu" not in add_flop_utilisation({"tokens_per_s": 1e9}, model, "cpu")


def test_the_timm_rows_say_why_they_did_not_run():
    if importlib.util.find_spec("timm") and torch.cuda.is_available():
        pytest.skip("timm and CUDA are here: the rows run (test_timm_graphed_step_trains_and_is_timed)")
    row = bench_timm_vit_lora(cuda_graphs=True)
    assert set(row) == {"skipped"} and "timm" in row["skipped"] and "CUDA" in row["skipped"]


def test_markdown_compares_vim_rows_with_both_timm_baselines_and_shows_mfu():
    report = {"device": "NVIDIA H200", "torch": "2.11", "cuda_graphs": True, "language_shape": [32, 256],
              "vision": {"lorap_x": {"step_s": 0.02, "images_per_s": 1600.0, "peak_mem_bytes": 2**30,
                                     "eval_images_per_s": 5120.4}},
              "language": {"mamba-1.4b": {"lora_in_proj": {"step_s": 0.4, "tokens_per_s": 20480.0, "mfu": 0.174,
                                                           "peak_mem_bytes": 2**33}}},
              "baselines": {TIMM_BASELINE: {"step_s": 0.03, "images_per_s": 1100.0, "peak_mem_bytes": 2**30},
                            TIMM_BASELINE + GRAPHED: {"skipped": "needs timm and a CUDA device"}}}
    text = markdown(report)
    assert "20,480 tok/s (17.4% MFU)" in text and "micro-batch 32 x 256 tokens" in text
    assert "| 1,600 img/s | 1.00 |  | 5,120 img/s |" in text  # the evaluation forward's throughput
    assert f"| vim-s lorap_x / {TIMM_BASELINE} | 1.455x |" in text
    assert f"| {TIMM_BASELINE + GRAPHED} | needs timm and a CUDA device |" in text


def test_the_table_projection_counts_every_row_and_the_papers_rows_apart():
    """The whole table's GPU-hours (steps of 19 tasks x 100 epochs, plus the test splits' forwards) and
    the paper's own Vim-S rows' share of it (vision/paper.yaml), in the JSON and the Markdown."""
    vision = {"full": {"step_s": 0.02, "images_per_s": 1600.0, "eval_images_per_s": 387_904 / 36.0},
              "sdt": {"step_s": 0.03, "images_per_s": 1066.7, "eval_images_per_s": 387_904 / 72.0},
              "broken": {"error": "out of memory"}}
    projection = project_vtab_hours(vision)
    full, sdt = (60_800 * 0.02 + 36.0) / 3600, (60_800 * 0.03 + 72.0) / 3600
    assert projection["per_method_hours"] == pytest.approx({"full": full, "sdt": sdt})
    assert projection["table_hours"] == pytest.approx(full + sdt)
    assert projection["paper_rows"] == ["full"] and projection["paper_rows_hours"] == pytest.approx(full)
    report = {"device": "NVIDIA H200", "torch": "2.11", "vision": vision, "language": {}, "baselines": {},
              "projection": projection}
    assert (f"table: **{full + sdt:.1f} h** (from the 2 rows measured); the paper's 1 rows among them "
            f"(those `vision/paper.yaml` publishes): **{full:.1f} h**, the 1 newer rows {sdt:.1f} h") in markdown(report)


@pytest.mark.gpu
@needs_timm
def test_timm_graphed_step_trains_and_is_timed():
    """The captured graph holds the optimizer step: each replay moves the LoRA weights."""
    model, step = timm_lora_step(batch=4, rank=4, cuda_graphs=True)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    before = [p.detach().clone() for p in lora_b]
    step()
    torch.cuda.synchronize()
    assert lora_b and all(not torch.equal(a, p) for a, p in zip(before, lora_b))
    row = bench_timm_vit_lora(batch=4, rank=4, warmup=1, steps=2, cuda_graphs=True)
    assert row["images_per_s"] > 0 and row["cuda_graphs"] is True


@pytest.mark.gpu
def test_language_rows_report_model_flop_utilisation_on_an_h200():
    row = bench_language_method("lora_in_proj", "mamba-mini", micro_batch=2, length=32, warmup=1, steps=2)
    assert row["tokens_per_s"] > 0 and row["model_params"] > 0
    if "H200" in torch.cuda.get_device_name():
        assert 0 < row["mfu"] < 1
    else:
        assert "mfu" not in row


def _record_with_a_failed_row() -> dict:
    vision = {"sdt": {"step_s": 0.03, "images_per_s": 1066.7, "eval_images_per_s": 5000.0},
              "full": {"step_s": 0.02, "images_per_s": 1600.0, "eval_images_per_s": 7000.0},
              "broken": {"error": "out of memory"}}
    return {"device": "NVIDIA H200", "torch": "2.11", "cuda_graphs": True, "vision": vision, "language": {},
            "baselines": {TIMM_BASELINE: {"step_s": 0.03, "images_per_s": 1100.0},
                          TIMM_BASELINE + GRAPHED: {"skipped": "needs timm and a CUDA device"},
                          "hf-mamba+peft-lora:mamba-1.4b": {"step_s": 0.4, "tokens_per_s": 20480.0}},
            "projection": project_vtab_hours(vision)}


def test_bench_plot_draws_a_records_image_rows_fastest_first_without_the_failed_one(tmp_path, capsys):
    """`mambapeft bench plot`: the record's measured image rows as bars, fastest first, coloured by whether
    vision/paper.yaml publishes them, a failed row left out, the image baselines measured as lines; the
    PNG beside the record unless --out says where."""
    from mambapeft.bench.figure import image_baselines, vision_rows
    from mambapeft.cli import main

    report = _record_with_a_failed_row()
    assert vision_rows(report) == [("full", 1600.0, True), ("sdt", 1066.7, False)]
    assert image_baselines(report) == {TIMM_BASELINE: 1100.0}
    record = tmp_path / "NVIDIA_H200-cuda_graphs.json"
    record.write_text(json.dumps(report))
    assert main(["bench", "plot", str(record)]) == 0
    assert capsys.readouterr().out.strip() == str(record.with_suffix(".png"))
    assert record.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "plot", str(record), "--out", str(tmp_path / "elsewhere.png")]) == 0
    assert (tmp_path / "elsewhere.png").stat().st_size > 0


@pytest.mark.parametrize("contents", ["{not json", '{"vision": {"full": {"error": "out of memory"}}}', "[1, 2]"])
def test_bench_plot_says_in_one_line_what_is_wrong_with_a_record(tmp_path, capsys, contents):
    from mambapeft.cli import main

    record = tmp_path / "record.json"
    record.write_text(contents)
    assert main(["-q", "bench", "plot", str(record)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mambapeft: error:") and str(record) in error and "\n" not in error
    assert "bench train" in error and not record.with_suffix(".png").exists()


def test_bench_train_draws_its_image_rows_beside_the_record_as_it_goes(tmp_path, monkeypatch):
    """run_benchmarks writes <device>.png with the .json and .md after each image row (an interrupted run
    keeps its picture too); the rows here stand in for the GPU's."""
    import mambapeft.bench.train as bench_train

    rates = iter([1066.7, 1600.0])  # sdt, then full: drawn fastest first
    monkeypatch.setattr(bench_train, "bench_vision_method",
                        lambda method, *args, **kwargs: {"step_s": 32 / (rate := next(rates)), "images_per_s": rate,
                                                         "eval_images_per_s": 5000.0})
    written = []
    monkeypatch.setattr(bench_train, "draw_throughput", lambda report, path, backbone: written.append(
        (path.name, [method for method, *_ in bench_train.vision_rows(report)])))
    bench_train.run_benchmarks(tmp_path, language_backbones=(), vision_methods=["sdt", "full"], baselines=False,
                               device="cpu")
    assert written == [("cpu.png", ["sdt"]), ("cpu.png", ["full", "sdt"])]
    assert {p.name for p in tmp_path.iterdir()} == {"cpu.json", "cpu.md"}  # the figure's writer is stood in for
