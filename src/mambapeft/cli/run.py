"""``mambapeft train`` (one run's training, or its resolved configuration with --dry-run),
``mambapeft evaluate`` (the trained run's evaluation) and ``mambapeft params``.

A subcommand that acts on one run takes the options of `common.add_run_arguments` and resolves them
with `common.spec_from_args`.
"""
from __future__ import annotations

import json

from ..runspec import training_spec
from .common import (add_execution_arguments, add_gpu_arguments, add_run_arguments, claim_gpus_for, positive_int,
                     spec_from_args, with_execution)


def add_parsers(subparsers) -> None:
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_params(subparsers)


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune one run (experiment, backbone, task, method, seed): "
                                            "adapter.safetensors, then train.json",
                              description="Trains one run, resuming from its checkpoint.pt when an earlier attempt "
                                          "was interrupted, and writes the adapter and the training record train.json "
                                          "(last). `mambapeft evaluate` then scores it.")
    add_run_arguments(p)
    add_execution_arguments(p)
    add_gpu_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved run configuration as JSON and exit")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    spec = training_spec(with_execution(spec_from_args(args), args))
    if args.dry_run:
        from ..train.dryrun import dry_run

        print(json.dumps(dry_run(spec), sort_keys=True))
        return
    claim_gpus_for(args, spec["runtime"]["device"])
    from ..train.runner import run_training

    record = run_training(spec)
    print(json.dumps({k: record.get(k) for k in ("status", "trainable_params", "train_seconds", "backend")}))


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate one trained run (its adapter on its backbone): metrics.json",
                              description="Reads the run's train.json and adapter.safetensors (written by `mambapeft "
                                          "train` with the same configuration), evaluates on the run's test split "
                                          "(vision) or evaluation tasks (language) and writes metrics.json last.")
    add_run_arguments(p)
    add_execution_arguments(p)
    add_gpu_arguments(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> None:
    spec = with_execution(spec_from_args(args), args)
    claim_gpus_for(args, spec["runtime"]["device"])
    from ..eval.run import evaluate_run

    record = evaluate_run(spec)
    print(json.dumps({k: record.get(k) for k in ("status", "metric", "value", "n_eval", "trainable_params")}))


def _add_params(subparsers) -> None:
    p = subparsers.add_parser("params", help="trainable-parameter count of a backbone + method, as JSON")
    p.add_argument("--backbone", required=True, help="a backbone id of the model registry (e.g. vim-s, mamba-130m)")
    p.add_argument("--method", required=True, help="a method id of vision/methods.yaml or language/methods.yaml")
    p.add_argument("--num-classes", type=positive_int, default=None, help="vision head size (default: 100, CIFAR-100)")
    p.set_defaults(func=cmd_params)


def cmd_params(args) -> None:
    from ..report.params import count_params

    print(json.dumps(count_params(args.backbone, args.method, args.num_classes)))
