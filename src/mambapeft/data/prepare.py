"""Make a configured dataset available and write its manifest (the data rule's output).

``source: mini`` writes the offline stand-ins deterministically from the entry's seed, and
``source: generated`` the synthetic recall tasks (kind ``synthetic``: the length study's data exist
only as generated); any other source is real data that must already be under ``root``: it is
validated (``data check``) and, when something is missing, the error names what and where to put
it. The manifest is written last, so its existence means the data is complete and checked.
"""
from __future__ import annotations

from pathlib import Path

from ..io import write_json_atomic
from .errors import DataError
from .mini_text import write_mini_commonsense, write_mini_math
from .mini_vision import write_mini_vtab
from .orca_math import write_mini_orca_math
from .synthetic import write_synthetic
from .yelp_polarity import write_standin as write_mini_yelp_polarity

KINDS = ("vtab", "commonsense", "math", "synthetic", "orca_math", "yelp_polarity")
WRITTEN_HERE = ("mini", "generated")  # sources whose files this step writes (the others are checked)


def _write_here(entry: dict, root: Path) -> dict:
    seed = int(entry.get("seed", 0))
    if entry["kind"] == "synthetic":
        return write_synthetic(root, entry, entry["tasks"])
    if entry["kind"] == "orca_math":
        return write_mini_orca_math(root, seed=seed, n_train=int(entry["n_train"]))
    if entry["kind"] == "yelp_polarity":
        return write_mini_yelp_polarity(root, entry)
    if entry["kind"] == "vtab":
        return write_mini_vtab(root, tasks=tuple(entry["tasks"]), seed=seed, image_size=int(entry["image_size"]),
                               n_train=int(entry["n_train"]), n_val=int(entry["n_val"]), n_test=int(entry["n_test"]))
    writer = write_mini_commonsense if entry["kind"] == "commonsense" else write_mini_math
    return writer(root, seed=seed, n_train=int(entry["n_train"]), n_test=int(entry["n_test"]))


def _check_real(entry: dict, root: Path) -> dict:
    from .check import check_dataset

    if entry["kind"] != "vtab":
        return check_dataset(entry["kind"], root)
    summaries, problems = {}, []
    for task in entry["tasks"]:
        try:
            summaries[task] = check_dataset("vtab", root, task)
        except DataError as err:
            problems.append(f"  {task}: {err}")
    if problems:
        raise DataError(f"VTAB-1k data under {root} is incomplete:\n" + "\n".join(problems))
    return summaries


def prepare_dataset(entry: dict, manifest: Path) -> dict:
    if entry.get("kind") not in KINDS:
        raise DataError(f"data entry kind {entry.get('kind')!r} is not one of {KINDS} (config `data:`)")
    root = Path(entry["root"])
    summary = _write_here(entry, root) if entry["source"] in WRITTEN_HERE else _check_real(entry, root)
    record = {"kind": entry["kind"], "source": entry["source"], "root": str(root), "checksums": summary}
    write_json_atomic(manifest, record)
    return record
