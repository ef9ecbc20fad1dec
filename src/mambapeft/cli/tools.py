"""``mambapeft lm-eval`` (lm-evaluation-harness with our model and local tasks), ``setup-gpu`` and
``peft-schema`` (the PEFT families' member schema the workflow validates methods.yaml with)."""
from __future__ import annotations

import json
import logging
import sys


def add_parsers(subparsers) -> None:
    _add_lm_eval(subparsers)
    _add_setup_gpu(subparsers)
    _add_peft_schema(subparsers)


def _add_peft_schema(subparsers) -> None:
    p = subparsers.add_parser("peft-schema", help="regenerate workflow/schemas/peft_members.schema.json from the "
                                                  "registered PEFT families (after adding or changing a family)")
    p.add_argument("--out", help="write here instead (default: the workflow's schema file)")
    p.set_defaults(func=cmd_peft_schema)


def cmd_peft_schema(args) -> None:
    from pathlib import Path

    from ..io import write_text_atomic
    from ..peft.schema import schema_path, schema_text

    out = Path(args.out) if args.out else schema_path()
    write_text_atomic(out, schema_text())
    print(out)


def _add_lm_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "lm-eval", help="lm-evaluation-harness with the model 'mambapeft' (backbone + adapter) and local tasks",
        description="lm-eval's own command line (every argument after the ones below goes to it), with the "
                    "model 'mambapeft' registered: --model mambapeft --model_args backbone=DIR[,adapter=FILE]"
                    "[,tokenizer=DIR][,scan_backend=auto] --device cuda|cpu --tasks ... With --data-root, the "
                    "commonsense tasks found there (eval/<task>/<split>.jsonl) are defined as lm-eval tasks "
                    "over those files, so nothing is downloaded. lm-eval's own options: `lm-eval run -h`.")
    p.add_argument("--data-root", help="a commonsense data root whose eval files become lm-eval tasks")
    p.add_argument("--family", default="commonsense", choices=("commonsense", "lm_eval_suite"),
                   help="which tasks of language/tasks.yaml the data root holds (lm_eval_suite: the Orca-Math "
                        "study's suite, each with its own few-shot count)")
    p.set_defaults(func=cmd_lm_eval, forwards_unknown_args=True)  # the only subcommand that passes arguments on


def cmd_lm_eval(args) -> None:
    import tempfile

    from ..data.errors import DataError
    from ..eval import lm_eval_model  # noqa: F401  (registers the model "mambapeft" with lm-eval)
    from ..eval.lm_eval_tasks import available_tasks, offline_datasets, write_task_definitions

    forwarded = list(args.forwarded)
    offline_datasets()
    with tempfile.TemporaryDirectory(prefix="mambapeft-lm-eval-") as scratch:
        if args.data_root:
            names = available_tasks(args.data_root, args.family)
            if not names:
                raise DataError(f"{args.data_root}: no {args.family} eval file (eval/<task>/<split>.jsonl of a task "
                                f"in language/tasks.yaml); point --data-root at a {args.family} data root")
            forwarded += ["--include_path", str(write_task_definitions(names, args.data_root, scratch, args.family))]
            logging.getLogger("mambapeft").info("local lm-eval tasks over %s: %s", args.data_root, ", ".join(names))
        sys.argv = ["lm-eval", *forwarded]
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()


def _add_setup_gpu(subparsers) -> None:
    p = subparsers.add_parser("setup-gpu", help="install the CUDA extras (mamba-ssm, causal-conv1d) and check the kernels run",
                              description="pip-installs mamba-ssm and causal-conv1d (from PyPI, compiled against this torch; "
                                          "or from a folder of prebuilt wheels), then checks them: they import and, on a "
                                          "CUDA device, one selective scan agrees with the PyTorch scan.")
    p.add_argument("--wheels", help="install from this folder of wheels (no network) instead of PyPI")
    p.add_argument("--dry-run", action="store_true", help="print the pip command and stop")
    p.add_argument("--check", action="store_true", help="only check the installed kernels")
    p.set_defaults(func=cmd_setup_gpu)


def cmd_setup_gpu(args) -> None:
    from ..setup_gpu import check_kernels, setup_gpu

    print(json.dumps(check_kernels() if args.check else setup_gpu(args.wheels, dry_run=args.dry_run)))
