"""Running the Snakemake workflow from tests, as a user would from a shell."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "config" / "tiny.yaml"
REMOVED = object()  # as set_nested's value: the key is removed


def set_nested(mapping: dict, path: str, value, separator: str = "/") -> None:
    """The entry of nested ``mapping`` at ``path`` ('a/b/c') set to ``value``, or removed where it is REMOVED."""
    *parents, key = path.split(separator)
    for parent in parents:
        mapping = mapping[parent]
    if value is REMOVED:
        del mapping[key]
    else:
        mapping[key] = value


def snakemake(*args, cwd, timeout=900, check=True, env=None):
    """Run Snakemake on the repository's Snakefile from ``cwd`` (with ``env`` added to the
    environment); return the completed process."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *map(str, args)]
    # rules call `mambapeft`: the console script of this interpreter's environment, even if not activated
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert done.returncode == 0, f"snakemake {' '.join(map(str, args))} failed:\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}"
    return done


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run or a run, as {rule: count}."""
    table = output.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
