"""results/benchmarks/profile/device_ab.sh, the GPU machine's A/B of a patch, run on a small tree with a
stand-in `python3` (no GPU here): the base tree and a patched copy alternate over the rounds, each run in
its own tree, the GPU tests run in the copy, and the tree itself and the temporary copy are left as they
were."""
import os
import pathlib
import subprocess
import textwrap

SCRIPT = pathlib.Path(__file__).parents[1] / "results" / "benchmarks" / "profile" / "device_ab.sh"
# what the stand-in prints: step_ab.py's line (its label and methods, the tree's marker), pytest's arguments
STAND_IN = textwrap.dedent("""\
    #!/usr/bin/env bash
    case "$*" in
      *source-digest*) echo "digest of $(cat marker.txt)" ;;
      *step_ab.py*) echo "$3 $2 marker=$(cat marker.txt) root=$MAMBAPEFT_ROOT"; echo "a UserWarning line" ;;
      *pytest*) echo "pytest in $(cat marker.txt): $*" ;;
    esac
    """)
PATCH = textwrap.dedent("""\
    diff --git a/marker.txt b/marker.txt
    --- a/marker.txt
    +++ b/marker.txt
    @@ -1 +1 @@
    -base
    +patched
    """)


def _run(tmp_path, *args):
    tree, bin_dir, out, scratch = (tmp_path / name for name in ("tree", "bin", "out", "scratch"))
    for folder in (tree, bin_dir, out, scratch):
        folder.mkdir()
    (tree / "marker.txt").write_text("base\n")
    (bin_dir / "python3").write_text(STAND_IN)
    (bin_dir / "python3").chmod(0o755)
    (tmp_path / "change.patch").write_text(PATCH)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "TMPDIR": str(scratch),
           "WHEELS": str(tmp_path / "no-wheels")}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "change.patch"), *args], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=60)
    return done, tree, out, scratch


def test_the_tree_and_its_patched_copy_alternate_and_the_copy_is_tested(tmp_path):
    done, tree, out, scratch = _run(tmp_path, "lorap_x,full", "2", "tests/test_scan_short.py")
    assert done.returncode == 0, done.stderr
    lines = (out / "ab.txt").read_text().splitlines()
    base = f"base lorap_x,full marker=base root={tree}"
    assert lines[::2] == [base, base] and len(lines) == 4  # warnings filtered out
    assert all(line.startswith("new lorap_x,full marker=patched root=") for line in lines[1::2])
    assert "pytest in patched: -m pytest -m gpu -n 14" in (out / "tests.log").read_text()
    assert "tests/test_scan_short.py" in (out / "tests.log").read_text()
    assert "digest of base" in done.stdout and "digest of patched" in done.stdout
    assert (tree / "marker.txt").read_text() == "base\n" and not any(scratch.iterdir())  # the copy removed


def test_without_a_patch_and_methods_it_prints_its_usage():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "device_ab.sh PATCH METHODS [ROUNDS [PYTEST ARGS...]]" in done.stdout
