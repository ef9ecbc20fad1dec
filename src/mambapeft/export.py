"""The merge job (``mambapeft merge``): a trained language run's adapter folded into its backbone's
weights (``peft/merge.py``) and written in the two published layouts, or the backbone itself
written the same way (the base model other tools evaluate beside the fine-tuned one).

Under the output directory: ``hf/``, transformers' ``MambaForCausalLM`` directory (config.json,
model.safetensors, tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` and
``lm_eval --model hf`` load as they are; ``mamba_ssm/`` (config.json, pytorch_model.bin), the
``state-spaces/mamba-*`` layout; then ``merge.json``, the record, last. Before loading, the job
checks the run's ``train.json`` as evaluation does (the adapter is the one training wrote for this
configuration); before writing, that the merged model computes the adapter model's logits on a
fixed token sequence.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from .build import TrainingRecordError, bare_spec, build_trainable, read_training_record
from .data.tokenizer import backbone_tokenizer_path, load_tokenizer, write_transformers_tokenizer
from .io import write_json_atomic
from .models.checkpoints import save_lm_hf, save_lm_mamba_ssm
from .models.lm import MambaLMHeadModel
from .peft.merge import check_mergeable, merge_method
from .runspec import ADAPTER, TRAIN_RECORD

log = logging.getLogger("mambapeft.export")

HF_DIR, MAMBA_SSM_DIR, MERGE_RECORD = "hf", "mamba_ssm", "merge.json"
CHECK_TOKENS = 64  # length of the fixed sequence the merged and adapter logits are compared on
CHECK_TOLERANCE = 1e-4  # of the logits' scale: fp32 rounding of W x + s B (A x) vs (W + s B A) x, over the layers


def _check_ids(model: MambaLMHeadModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, CHECK_TOKENS), generator=generator)


def _refuse_leftovers(model: nn.Module) -> None:
    """After folding, the model must hold exactly a plain backbone's tensors, or the layouts would drop some."""
    with torch.device("meta"):
        plain = set(MambaLMHeadModel(model.config).state_dict())
    extra, missing = sorted(set(model.state_dict()) - plain), sorted(plain - set(model.state_dict()))
    if extra or missing:
        raise RuntimeError(f"after merging, the model's tensors differ from a plain backbone's: extra {extra[:5]}, "
                           f"missing {missing[:5]}; a family's merge left modules behind")


def write_layouts(model: MambaLMHeadModel, tokenizer_path: str, out_dir: Path) -> dict:
    """``hf/`` and ``mamba_ssm/`` under ``out_dir``; returns their paths."""
    tokenizer = load_tokenizer(tokenizer_path)
    hf, mamba_ssm = out_dir / HF_DIR, out_dir / MAMBA_SSM_DIR
    save_lm_hf(model, hf, tokenizer.eos_id)
    write_transformers_tokenizer(tokenizer, hf)
    save_lm_mamba_ssm(model, mamba_ssm)
    return {"hf": str(hf), "mamba_ssm": str(mamba_ssm)}


def _trained_adapter(spec: dict) -> tuple[Path, str]:
    """The run's adapter and its sha256, once ``train.json`` shows that training finished with it
    for this configuration; any other file under that name would be merged and labelled as this run."""
    run_dir = Path(spec["output_dir"])
    record = read_training_record(run_dir, spec)
    if record["status"] != "ok":  # a diverged run's record is valid, but it has no adapter to fold
        raise TrainingRecordError(f"{run_dir / TRAIN_RECORD}: training ended with status {record['status']!r} "
                                  f"({record.get('reason')}); there is no adapter to merge: re-run its training job")
    return run_dir / ADAPTER, record["adapter_sha256"]


@torch.no_grad()
def merge_run(spec: dict, out_dir: str | Path) -> dict:
    """Fold the run's adapter (``<output_dir>/adapter.safetensors``) into its backbone and write the layouts."""
    method = spec["method"]
    check_mergeable(method["peft"], method["id"])  # before loading gigabytes of weights
    adapter, adapter_sha256 = _trained_adapter(spec)
    model = build_trainable(spec, torch.device("cpu"), adapter=adapter).model.eval()
    ids = _check_ids(model)
    expected = model(ids)
    merge_method(model, method["peft"], method["id"])
    _refuse_leftovers(model)
    difference = float((model(ids) - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if difference > CHECK_TOLERANCE * scale:
        raise RuntimeError(f"the merged model's logits differ from the adapter model's by {difference:.3g} "
                           f"(max |logit| {scale:.3g}); the merge of method {method['id']!r} is wrong")
    out_dir = Path(out_dir)
    record = {"run": spec.get("run"), "method": method["id"], "adapter": str(adapter), "adapter_sha256": adapter_sha256,
              "families": sorted({m["family"] for m in method["peft"]}),
              "check": {"tokens": CHECK_TOKENS, "max_abs_logit_difference": difference},
              "tie_embeddings": model.config.tie_embeddings,
              **write_layouts(model, backbone_tokenizer_path(spec["backbone"]), out_dir)}
    write_json_atomic(out_dir / MERGE_RECORD, record)
    log.info("merged %s: logits within %.3g of the adapter model's", method["id"], difference)
    return record


def export_backbone(backbone: dict, out_dir: str | Path) -> dict:
    """The backbone as it is (``backbone``: its config entry with ``id`` and ``path``), in both layouts."""
    spec = bare_spec("language", backbone["id"], {"id": "base", "peft": []}, path=backbone["path"])
    model = build_trainable(spec).model.eval()
    out_dir = Path(out_dir)
    record = {"backbone": backbone["id"], "source": backbone["path"],
              **write_layouts(model, backbone_tokenizer_path(backbone), out_dir)}
    write_json_atomic(out_dir / MERGE_RECORD, record)
    return record
