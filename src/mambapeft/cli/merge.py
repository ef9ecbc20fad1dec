"""``mambapeft merge``: fold a trained run's adapter into its backbone's weights and write the
transformers and mamba_ssm layouts (``mambapeft.export``); with ``--backbone-spec``, the backbone
itself in the same layouts (the base model)."""
from __future__ import annotations

import json

from ..runspec import ConfigError
from .common import add_run_arguments, json_arg, spec_from_args


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="fold a run's adapter into the weights: <out>/hf (transformers), <out>/mamba_ssm, merge.json",
        description="Reads the run's adapter.safetensors (written by `mambapeft train` with the same configuration), "
                    "folds every member of its method into the backbone's weights (LoRA and DoRA, (IA)3, partial and "
                    "full tuning, ProDiaL, SDT, the hybrid by importance and Hugging Face peft's tuners fold; affix, "
                    "prompt, input-token, additional-scan, state-offset and parallel-adapter members cannot), "
                    "checks that the merged model gives the adapter model's logits, and writes <out>/hf (transformers' "
                    "MambaForCausalLM: config.json, model.safetensors, tokenizer files), <out>/mamba_ssm (config.json, "
                    "pytorch_model.bin) and <out>/merge.json last.")
    add_run_arguments(p)
    p.add_argument("--backbone-spec", help="instead of a run: a backbone's config entry as JSON, with `id` and `path`; "
                                           "writes the unmodified backbone in both layouts")
    p.add_argument("--out", required=True, help="output directory (the pipeline's results/merged/<run>/)")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> None:
    from ..export import export_backbone, merge_run

    if args.backbone_spec:
        backbone = json_arg(args.backbone_spec)
        missing = [key for key in ("id", "path") if key not in backbone]
        if missing:
            raise ConfigError(f"--backbone-spec lacks {missing}; give the backbone's config entry with `id` and `path`")
        record = export_backbone(backbone, args.out)
    else:
        spec = spec_from_args(args)
        if spec["domain"] != "language":
            raise ConfigError(f"merge writes language models; run {spec['run']} is a {spec['domain']} run")
        record = merge_run(spec, args.out)
    print(json.dumps(record))
