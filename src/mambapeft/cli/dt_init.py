"""``mambapeft dt-init``: the dt_bias initialisation study's jobs (stand-in corpora, tokenization,
pretraining, perplexity, table and figures). Rules pass each job its ``--spec`` from
``runspec.dt_init_*``."""
from __future__ import annotations

import json
from pathlib import Path

from ..runspec import ConfigError
from .common import (add_execution_arguments, add_gpu_arguments, add_table_outputs, claim_gpus_for, json_arg,
                     require_spec_keys, with_execution)

TRAINING_KEYS = ("run", "model", "dt_init", "tokens", "train", "runtime", "output_dir")


def add_parsers(subparsers) -> None:
    study = subparsers.add_parser("dt-init", help="the dt_bias initialisation study (Mamba-2 from scratch -> perplexity)")
    commands = study.add_subparsers(dest="dt_init_command", required=True)
    _add_standin(commands)
    _add_tokenize(commands)
    _add_pretrain(commands)
    _add_perplexity(commands)
    _add_table(commands)
    _add_figures(commands)


def _add_standin(commands) -> None:
    p = commands.add_parser("standin", help="write the offline stand-in corpora (parquet) and tokenizer beside a manifest")
    p.add_argument("--spec", required=True, help="config dt_init/standin as JSON")
    p.add_argument("--manifest", required=True, help="manifest.json to write last; the files go in its directory")
    p.set_defaults(func=cmd_standin)


def cmd_standin(args) -> None:
    from ..data.standin_text import write_standin

    spec, manifest = json_arg(args.spec), Path(args.manifest)
    write_standin(manifest.parent, manifest, spec["seed"], spec["n_train_docs"], spec["n_test_docs"], spec["vocab_size"])


def _add_tokenize(commands) -> None:
    p = commands.add_parser("tokenize", help="tokenize a local corpus once into a memory-mapped token array")
    p.add_argument("--spec", required=True, help='JSON {"corpus": {path, format, ...}, "tokenizer": ..., "layout": ...}')
    p.add_argument("--tokens", required=True, help="the token array (.bin) to write")
    p.add_argument("--meta", required=True, help="its metadata (.json), written last")
    p.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args) -> None:
    from ..data.token_cache import tokenize_corpus

    spec = json_arg(args.spec)
    record = tokenize_corpus(spec["corpus"], spec["tokenizer"], spec["layout"], Path(args.tokens), Path(args.meta))
    print(json.dumps({k: record[k] for k in ("n_tokens", "n_documents", "layout")}))


def _add_run_arguments(p) -> None:
    p.add_argument("--spec", help="the run's resolved spec as JSON (what the rule passes)")
    p.add_argument("--config", nargs="+", help="config file(s), merged left to right (instead of --spec)")
    p.add_argument("--init", help="with --config: the dt initialisation")
    p.add_argument("--seed", type=int, help="with --config: the seed")
    add_execution_arguments(p)
    add_gpu_arguments(p)


def _run_spec(args, training: bool) -> dict:
    """--spec as given, else resolved from --config, --init and --seed; every key the job reads present."""
    from ..runspec import DT_INIT, InitRun, dt_init_spec, dt_init_training_spec, load_config

    if args.spec:
        spec = json_arg(args.spec)
    elif args.config and args.init and args.seed is not None:
        config = load_config(*args.config)
        if DT_INIT not in config:
            raise ConfigError(f"{' '.join(args.config)}: no `{DT_INIT}` section (see config/config.yaml)")
        spec = dt_init_spec(config, InitRun(args.init, args.seed))
        spec = dt_init_training_spec(spec) if training else spec
    else:
        raise ConfigError("give --spec JSON, or --config with --init and --seed")
    require_spec_keys(spec, TRAINING_KEYS + (() if training else ("perplexity",)), "runspec.dt_init_spec")
    return with_execution(spec, args)


def _add_pretrain(commands) -> None:
    p = commands.add_parser("pretrain", help="train one (init, seed) Mamba LM from scratch: model/, then pretrain.json")
    _add_run_arguments(p)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args) -> None:
    spec = _run_spec(args, training=True)
    claim_gpus_for(args)
    from ..train.from_scratch import run_pretraining

    record = run_pretraining(spec)
    print(json.dumps({k: record.get(k) for k in ("status", "init", "seed", "final_loss", "train_seconds")}))


def _add_perplexity(commands) -> None:
    p = commands.add_parser("perplexity", help="perplexity of one pretrained run on the held-out text: perplexity.json")
    _add_run_arguments(p)
    p.set_defaults(func=cmd_perplexity)


def cmd_perplexity(args) -> None:
    spec = _run_spec(args, training=False)
    claim_gpus_for(args)
    from ..eval.perplexity import evaluate_perplexity

    record = evaluate_perplexity(spec)
    print(json.dumps({k: record.get(k) for k in ("status", "init", "seed", "perplexity", "word_perplexity")}))


def _add_table(commands) -> None:
    p = commands.add_parser("table", help="results/tables/dt_init.{csv,md} from the runs' perplexity.json")
    add_table_outputs(p)
    p.add_argument("records", nargs="+", help="perplexity.json of every run")
    p.set_defaults(func=cmd_table)


def cmd_table(args) -> None:
    from ..report.dt_init import write_dt_init_table

    write_dt_init_table(args.records, Path(args.csv), Path(args.md))


def _add_figures(commands) -> None:
    p = commands.add_parser("figures", help="training-loss and initial-dt figures from the runs' pretrain.json")
    p.add_argument("--loss", required=True, help="output PNG: training loss per init (mean, min-max band)")
    p.add_argument("--dt", required=True, help="output PNG: initial dt per head of each init")
    p.add_argument("records", nargs="+", help="pretrain.json of every run")
    p.set_defaults(func=cmd_figures)


def cmd_figures(args) -> None:
    from ..report.dt_init import write_dt_init_figures

    write_dt_init_figures(args.records, Path(args.loss), Path(args.dt))
