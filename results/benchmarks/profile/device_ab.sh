#!/usr/bin/env bash
# A patch against this tree, timed and tested on one GPU machine in one call: graphed Vim-S training steps of
# this tree ("base") and of a copy with the patch applied ("new"), alternated over rounds (step_ab.py), then
# the GPU tests of the patched copy. The README's and HISTORY.md's "step A/B" figures; the not-kept
# patches beside this file run again as they were measured.
#
#   bash results/benchmarks/profile/device_ab.sh PATCH METHODS [ROUNDS [PYTEST ARGS...]]
#   bash results/benchmarks/profile/device_ab.sh results/benchmarks/profile/not-kept-casts-bc.patch \
#       lorap_x,full,additional_scan 2 tests/test_scan_short.py tests/test_fused_inner.py
#
# PATCH: `git diff` output against this tree (`git apply` puts it on a copy, outside any repository);
# METHODS: vision methods, comma-separated; ROUNDS: default 2; PYTEST ARGS: what the patched copy's
# `pytest -m gpu -n 14` runs (none: no tests). $WHEELS: a folder of wheels installed first (default .whl, the
# device README's; mamba-ssm's and causal-conv1d's from ../shared/wheels). The timings also go to
# $OUT/ab.txt and the tests' output to $OUT/tests.log ($OUT: the GPU machine's folder that comes back).
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,/^set /p' "$0" | sed '$d'; exit 2; fi
patch_file=$(realpath "$1") methods=$2 rounds=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
out=${OUT:-$(mktemp -d)}
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$wheels"/*.whl
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
new=$scratch/tree
mkdir -p "$new" && tar --exclude=./.git --exclude=./.whl --exclude=./.venv -cf - . | tar -xf - -C "$new"
(cd "$new" && git apply "$patch_file")  # outside a repository, as `patch -p1` (the patches are `git diff`s)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader || true
echo "base: $(PYTHONPATH=src python3 -m mambapeft.cli bench source-digest)"
echo "new:  $(cd "$new" && PYTHONPATH=src python3 -m mambapeft.cli bench source-digest)"
step() {  # TREE LABEL: one step_ab.py run of every method on the tree's own package and data files
    (cd "$1" && PYTHONPATH=src MAMBAPEFT_ROOT="$1" python3 results/benchmarks/profile/step_ab.py "$methods" "$2" 2>&1 \
        | grep -v -i -e warn -e run_backward || true)
}
for _ in $(seq "$rounds"); do
    step "$PWD" base
    step "$new" new
done | tee "$out/ab.txt"
date -u
if [ $# -gt 0 ]; then
    (cd "$new" && PYTHONPATH=src python3 -m pytest -m gpu -n 14 -q -rf -p no:cacheprovider "$@" 2>&1 \
        | tee "$out/tests.log" | tail -3)
fi
