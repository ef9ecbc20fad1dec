"""``mambapeft lm-eval-suite``: the Orca-Math study's lm-eval suite (its local task files, one
evaluation job per base or fine-tuned model, the table and figure). Rules pass each job a ``--spec``
computed by workflow/rules/common.smk from the config's ``lm_eval_suite`` section."""
from __future__ import annotations

import json
from pathlib import Path

from .common import add_gpu_arguments, add_table_outputs, claim_gpus_for, json_arg, require_spec_keys

EVALUATE_KEYS = ("backbone", "model", "run", "tasks", "data_root", "lm_eval", "device", "batch_size")


def add_parsers(subparsers) -> None:
    suite = subparsers.add_parser("lm-eval-suite", help="the Orca-Math study's lm-eval suite (local tasks, base vs fine-tuned)")
    commands = suite.add_subparsers(dest="lm_eval_suite_command", required=True)
    _add_data(commands)
    _add_evaluate(commands)
    _add_report(commands)


def _add_data(commands) -> None:
    p = commands.add_parser("data", help="write the offline stand-ins of the suite's tasks, or check the local copies")
    p.add_argument("--spec", required=True, help='JSON {"source": "mini"|"local", "root", "tasks", "seed", "n_test", "n_fewshot"}')
    p.add_argument("--manifest", required=True, help="manifest.json, written last")
    p.set_defaults(func=cmd_data)


def cmd_data(args) -> None:
    from ..data.language_tasks import language_task
    from ..data.mini_text.suite import write_mini_suite
    from ..eval.lm_eval_suite import FAMILY
    from ..eval.lm_eval_tasks import eval_files
    from ..io import sha256_file, write_json_atomic

    spec = json_arg(args.spec)
    entries = [language_task(FAMILY, name) for name in spec["tasks"]]
    if spec["source"] == "mini":
        summary = write_mini_suite(spec["root"], entries, seed=int(spec["seed"]), n_test=int(spec["n_test"]),
                                   n_fewshot=int(spec["n_fewshot"]))
    else:  # local copies: the task definitions need every file; lm-eval reads the records
        from ..data.errors import DataError

        files = {path for entry in entries for path in eval_files(spec["root"], entry).values()}
        missing = sorted(str(p) for p in files if not p.is_file())
        if missing:
            raise DataError(f"lm-eval suite files missing: {', '.join(missing)}; export them with a `hub_datasets` "
                            "entry of `family: lm_eval_suite` (config/paper.yaml), write each split's Hugging Face records "
                            "there as JSON lines, or use `source: mini`")
        summary = {"files": {str(p): sha256_file(p) for p in sorted(files)}}
    write_json_atomic(args.manifest, {"source": spec["source"], "root": str(spec["root"]), **summary})


def _add_evaluate(commands) -> None:
    p = commands.add_parser("evaluate", help="one model on the suite's tasks (and, for a fine-tuned model, the "
                                             "merged-vs-adapter agreement check); writes its record")
    p.add_argument("--spec", required=True, help="the job's spec as JSON (what the rule passes)")
    p.add_argument("--out", required=True, help="the record (JSON), written last")
    add_gpu_arguments(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> None:
    from ..eval.lm_eval_suite import agreement, evaluate_suite
    from ..io import write_json_atomic
    from ..runtime import resolve_device

    spec = json_arg(args.spec)
    require_spec_keys(spec, EVALUATE_KEYS, "common.smk suite_base_spec, suite_tuned_spec")
    claim_gpus_for(args, spec["device"])
    device = str(resolve_device(spec["device"]))
    common = {"device": device, "batch_size": int(spec["batch_size"]), "limit": spec.get("limit")}
    evaluated = evaluate_suite(spec["lm_eval"]["model"], spec["lm_eval"]["model_args"], spec["tasks"], spec["data_root"],
                               gen_kwargs=spec.get("gen_kwargs"), **common)
    record = {"status": "ok", **{k: spec[k] for k in ("backbone", "model", "run", "tasks")},
              "data_source": spec.get("data_source", ""), "lm_eval_model": spec["lm_eval"]["model"],
              "model_args": spec["lm_eval"]["model_args"], "device": device, "scores": evaluated["scores"]}
    check = spec.get("crosscheck")
    if check:  # the same weights loaded another way must score alike
        other = evaluate_suite(check["model"], check["model_args"], check["tasks"], spec["data_root"], **common)
        record["crosscheck"] = {"lm_eval_model": check["model"], "model_args": check["model_args"],
                                **agreement(evaluated, other, atol=float(check["atol"]))}
    write_json_atomic(Path(args.out), record)
    print(json.dumps({"scores": record["scores"], "agree": record.get("crosscheck", {}).get("agree")}))


def _add_report(commands) -> None:
    p = commands.add_parser("report", help="the suite's table (csv, md) and per-task change figure from its records")
    p.add_argument("records", nargs="+", help="base and fine-tuned evaluation records (JSON)")
    p.add_argument("--readings", required=True, help="the study's numbers (language/orca_math_lm_eval.yaml)")
    p.add_argument("--title", required=True, help="the experiment's name, for headings")
    add_table_outputs(p)
    p.add_argument("--figure", required=True, help="the per-task change figure (PNG)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> None:
    from ..report.lm_eval_suite import write_suite_report

    table = write_suite_report(args.records, Path(args.readings), Path(args.csv), Path(args.md), Path(args.figure),
                               args.title)
    print(f"{len(table)} rows -> {args.csv}")
