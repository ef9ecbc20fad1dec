"""Generation speed: greedy decoding of ``new`` tokens after a ``prompt``-token prompt, with the same
weights in every implementation:

* ours: step mode with the decode steps captured as CUDA graphs, 16 tokens per replay
  (``models/decoding.py``), on the step kernels mamba_ssm's own step runs (``Mamba.uses_step_kernels``),
  bare and with adapters active (affix, additional-scan, periodic: methods whose generation needs
  the recurrent state, which the original MambaPEFT code cannot do);
* mamba-ssm's ``MambaLMHeadModel.generate(cg=True)``, built from our checkpoint layout (``save_lm``);
* transformers' ``generate`` (``MambaForCausalLM`` / ``Mamba2ForCausalLM``, its CUDA-kernel path).

On CUDA all run with bf16 weights and activations (``model.to(bfloat16)``, as mamba-ssm; ours under
a bf16 autocast that casts nothing but an adapter's fp32 intermediates; the recurrent states stored
in bf16 as mamba-ssm's inference cache stores them, plus a row with fp32 states); on CPU (the tests) in fp32, without graphs and without mamba-ssm. Timing: one warm-up call
(graph capture, autotuning), then the median of ``repeats`` synchronised calls (per backbone:
fewer for the large ones keeps a run within minutes). ``tokens_per_s`` = batch x
new / the time of a call generating ``new`` tokens; ``ms_per_token`` = (that time - the time of a
call generating 1 token, i.e. the prefill) / (new - 1): the per-token decode latency.
"""
from __future__ import annotations

import copy
import json
import logging
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..io import write_json_atomic, write_text_atomic
from ..models import build_model
from ..models.checkpoints import build_lm_from_dir, save_lm_mamba_ssm
from ..models.decoding import GreedyDecoder
from ..models.lm import LM_VARIANTS
from ..models.precision import keep_ssm_parameters_in_fp32
from ..peft import PeftConfigError, apply_peft
from ..runspec import ConfigError, domain_file, method_definition
from ..runtime import PERMISSIVE, device_name, select_backend
from .common import error_row, release_memory, timed_calls
from .hf import hf_causal_lm
from .train import AFFIX_TOO_LARGE

log = logging.getLogger("mambapeft.bench")

ADAPTER_METHODS = ("affix", "additional_scan", "periodic")
MAMBA_SSM, TRANSFORMERS = "mamba-ssm generate(cg=True)", "transformers generate"
FP32_STATES = "ours, fp32 states"

Generate = Callable[[torch.Tensor, int], torch.Tensor]  # (prompt ids (B, P), n) -> new tokens (B, n)


def _median_seconds(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    return statistics.median(timed_calls(call, repeats, device))


def time_generation(generate: Generate, ids: torch.Tensor, new: int, repeats: int) -> tuple[dict, torch.Tensor]:
    """One implementation at one batch size: its row and the tokens it generated."""
    tokens = generate(ids, new)  # the warm-up call
    if tokens.shape != (ids.shape[0], new):
        raise RuntimeError(f"generated {tuple(tokens.shape)} tokens, expected {(ids.shape[0], new)} (stopped early?)")
    full = _median_seconds(lambda: generate(ids, new), repeats, ids.device)
    prefill = _median_seconds(lambda: generate(ids, 1), repeats, ids.device)
    return {"generate_s": full, "prefill_s": prefill, "tokens_per_s": ids.shape[0] * new / full,
            "ms_per_token": 1e3 * (full - prefill) / max(new - 1, 1)}, tokens


def _ours(model, device: torch.device, state_dtype: torch.dtype | None = None) -> Callable[[int], Generate]:
    """Per batch size, a greedy decoder (on CUDA its decode steps captured once) -> its generate.
    The recurrent states are stored in the model's dtype, as mamba_ssm's inference cache keeps them,
    unless ``state_dtype`` says otherwise (the step computes in fp32 either way)."""
    state_dtype = state_dtype or next(model.parameters()).dtype

    def autocast():  # the weights are bf16 already: no per-token weight cast; none cached across a capture
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    def for_batch(batch: int) -> Generate:
        if device.type == "cuda":
            return GreedyDecoder(model, batch, device, cuda_graph=True, autocast=autocast,
                                 state_dtype=state_dtype).generate
        return GreedyDecoder(model, batch, device, state_dtype=state_dtype).generate
    return for_batch


def _for_inference(model, device: torch.device, dtype: torch.dtype):
    model = model.to(device, dtype).eval()
    keep_ssm_parameters_in_fp32(model)  # as mamba-ssm's model holds them
    select_backend(model, device, PERMISSIVE)
    return model


def _mamba_ssm(ours_bare, device: torch.device, dtype: torch.dtype) -> Callable[[int], Generate]:
    """mamba-ssm's model from our checkpoint written in its layout (config.json + pytorch_model.bin),
    read as its ``from_pretrained`` does (``MambaConfig(**config.json)``, strict load), without the hub lookup."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    with tempfile.TemporaryDirectory() as directory:
        save_lm_mamba_ssm(ours_bare, directory)
        config = MambaConfig(**json.loads((Path(directory) / "config.json").read_text()))
        model = MambaLMHeadModel(config, device=device, dtype=dtype)
        model.load_state_dict(torch.load(Path(directory) / "pytorch_model.bin", map_location=device,
                                         weights_only=True))
    model.eval()

    def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(ids, max_length=ids.shape[1] + n, cg=True, top_k=1)[:, ids.shape[1]:]
    return lambda batch: generate


def _transformers(ours_bare, device: torch.device, dtype: torch.dtype) -> Callable[[int], Generate]:
    from transformers import GenerationConfig

    model = hf_causal_lm(ours_bare.config, device, dtype, ours_bare.state_dict()).eval()

    def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        config = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return out[:, ids.shape[1]:]
    return lambda batch: generate


def _base_model(backbone: str, weights_root: Path, device: torch.device):
    """fp32 on ``device`` (initialised there): the checkpoint at weights_root/backbone if present,
    else random weights of the real sizes. Returns (model, where the weights came from)."""
    directory = weights_root / backbone
    with torch.device(device):
        if (directory / "config.json").is_file():
            return build_lm_from_dir(directory), str(directory)
        return build_model(backbone), f"random-init (no checkpoint at {directory})"


def _adapted(base, backbone: str, method: str, device: torch.device):
    model = copy.deepcopy(base)
    with torch.device(device):
        apply_peft(model, method_definition("language", method, backbone, None)["peft"], method)
    return model


def _agreement(tokens: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    """Fraction of generated positions equal to ours (bf16 kernels differ: greedy paths may part)."""
    return None if reference is None else float((tokens == reference).float().mean())


def _measure(name: str, make: Callable[[], Callable[[int], Generate]], prompts: dict[int, torch.Tensor], new: int,
             repeats: int, reference: dict[int, torch.Tensor]) -> dict:
    """Rows of one implementation for every batch size; a failure is its row's error, the others still run."""
    rows = {}
    try:
        for_batch = make()
    except PeftConfigError as err:  # a method whose family this mixer does not have (e.g. affix on Mamba-2)
        return {batch: {"skipped": str(err)} for batch in prompts}
    except Exception as err:
        log.exception("generation benchmark: building %s failed", name)
        return {batch: error_row(err) for batch in prompts}
    for batch, ids in prompts.items():
        log.info("generate %s batch %d", name, batch)
        try:
            row, tokens = time_generation(for_batch(batch), ids, new, repeats)
        except Exception as err:
            log.exception("generation benchmark: %s at batch %d failed", name, batch)
            rows[batch] = error_row(err)
            continue
        if name == "ours":
            reference[batch] = tokens
        rows[batch] = {**row, "token_agreement_with_ours": _agreement(tokens, reference.get(batch))}
    del for_batch
    release_memory()
    return rows


def bench_backbone(backbone: str, batches: list[int], prompt: int, new: int, methods: list[str], repeats: int,
                   weights_root: Path, device: torch.device, baselines: bool = True) -> dict:
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    base, weights = _base_model(backbone, weights_root, device)
    bare = _for_inference(copy.deepcopy(base), device, dtype)
    generator = torch.Generator(device).manual_seed(0)
    prompts = {b: torch.randint(0, base.config.vocab_size, (b, prompt), generator=generator, device=device)
               for b in batches}
    reference: dict[int, torch.Tensor] = {}
    rows = {"ours": _measure("ours", lambda: _ours(bare, device), prompts, new, repeats, reference)}
    if on_cuda:  # what keeping the states in fp32 (the training step's precision) costs
        rows[FP32_STATES] = _measure(FP32_STATES, lambda: _ours(bare, device, torch.float32), prompts, new, repeats,
                                     reference)
    for method in methods:
        if method == "affix" and backbone in AFFIX_TOO_LARGE:
            rows[f"ours+{method}"] = {b: {"skipped": "affix's projection is too large here (run at mamba-130m)"}
                                      for b in batches}
            continue
        def adapted(method=method):
            return _ours(_for_inference(_adapted(base, backbone, method, device), device, dtype), device)
        rows[f"ours+{method}"] = _measure(f"ours+{method}", adapted, prompts, new, repeats, reference)
    if baselines:
        if on_cuda:
            rows[MAMBA_SSM] = _measure(MAMBA_SSM, lambda: _mamba_ssm(bare, device, dtype), prompts, new, repeats,
                                       reference)
        else:
            rows[MAMBA_SSM] = {b: {"skipped": "mamba-ssm generates on CUDA only"} for b in batches}
        rows[TRANSFORMERS] = _measure(TRANSFORMERS, lambda: _transformers(bare, device, dtype), prompts, new,
                                      repeats, reference)
    return {"weights": weights, "dtype": str(dtype).removeprefix("torch."),
            "backend": bare.backbone.layers[0].mixer.backend.name, "rows": rows}


def run_generate_bench(out_dir: Path, backbones: list[str], batches: list[int], prompt: int, new: int,
                       methods: list[str] = ADAPTER_METHODS, repeats: int | list[int] = 3,
                       weights_root: Path = Path("resources/weights"), device: str = "cuda",
                       baselines: bool = True) -> dict:
    """Every backbone; the report is written after each one (an interrupted run keeps what it measured).
    ``repeats``: one count for all, or one per backbone in order (the last one for the rest)."""
    _refuse_unknown(backbones, LM_VARIANTS, "LM variants")
    _refuse_unknown(methods, domain_file("language", "methods"), "language methods")
    repeats = [repeats] if isinstance(repeats, int) else list(repeats)
    if not repeats or min(repeats) < 1:
        raise ConfigError(f"bench generate: repeats must be one or more counts >= 1, got {repeats}")
    device = torch.device(device)
    name = device_name(device)
    report = {"device": name, "torch": torch.__version__, "prompt": prompt, "new": new, "repeats": repeats,
              "batches": batches, "backbones": {}}
    stem = out_dir / f"generate_{name.replace(' ', '_')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, backbone in enumerate(backbones):
        count = repeats[min(i, len(repeats) - 1)]
        report["backbones"][backbone] = {**bench_backbone(backbone, batches, prompt, new, methods, count,
                                                          weights_root, device, baselines), "repeats": count}
        write_json_atomic(stem.with_suffix(".json"), report)
        write_text_atomic(stem.with_suffix(".md"), markdown(report))
    return report


def _refuse_unknown(names: list[str], known, what: str) -> None:
    """A ConfigError (before anything runs) naming those of ``names`` not in ``known``."""
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"bench generate: unknown {what} {unknown}; known: {', '.join(known)}")


def markdown(report: dict) -> str:
    lines = [f"# Generation speed on {report['device']} (torch {report['torch']})", "",
             f"Greedy decoding of {report['new']} new tokens after a {report['prompt']}-token prompt; median of "
             "the stated number of calls after a warm-up. tok/s = batch x new tokens / call time; ms/token = "
             "per-token decode latency (call time minus the prefill's, over the remaining tokens). Agreement: "
             "fraction of generated tokens equal to ours (bare model).", ""]
    for backbone, entry in report["backbones"].items():
        calls = f"{entry['repeats']} call" + ("s" if entry["repeats"] > 1 else "")
        lines += [f"## {backbone} ({entry['dtype']}; weights: {entry['weights']}; median of {calls})", "",
                  "| implementation | batch | tok/s | ms/token | prefill (ms) | agreement | ours / this (tok/s) |",
                  "|---|---|---|---|---|---|---|"]
        ours = entry["rows"].get("ours", {})
        for name, rows in entry["rows"].items():
            for batch, row in rows.items():
                lines.append(_line(name, batch, row, ours.get(batch, {})))
        lines.append("")
    return "\n".join(lines)


def _line(name: str, batch, row: dict, ours: dict) -> str:
    if "tokens_per_s" not in row:
        return f"| {name} | {batch} | {row.get('error', row.get('skipped', ''))[:80]} | | | | |"
    agreement = row.get("token_agreement_with_ours")
    ratio = f"{ours['tokens_per_s'] / row['tokens_per_s']:.2f}x" if "tokens_per_s" in ours else ""
    return (f"| {name} | {batch} | {row['tokens_per_s']:,.0f} | {row['ms_per_token']:.2f} | {row['prefill_s'] * 1e3:.1f} "
            f"| {'' if agreement is None else f'{agreement:.3f}'} | {ratio} |")
