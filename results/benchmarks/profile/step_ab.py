"""Graphed Vim-S training steps of one source tree, as ``bench train --cuda-graphs`` builds them (batch 32 at
224 px, random weights and images): per method, ms a step, the median of 5 runs of 20 steps queued back to
back after 10 untimed. Run it once per tree in one call, trees alternated (the README's "step A/B" figures):

    PYTHONPATH=OLD/src MAMBAPEFT_ROOT=$PWD python3 results/benchmarks/profile/step_ab.py lorap_x,full old
    PYTHONPATH=src python3 results/benchmarks/profile/step_ab.py lorap_x,full new
"""
import argparse
import statistics

from mambapeft.bench.common import release_memory, timed_queued_calls
from mambapeft.bench.train import _vision_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", help="vision methods, comma-separated (e.g. lorap_x,lora_in_proj,full)")
    parser.add_argument("label", nargs="?", default="tree", help="the tree's name in the printed lines")
    args = parser.parse_args()
    for method in args.methods.split(","):
        model, result, backend, step = _vision_step(method, "vim-s", 32, 224, True)
        for _ in range(10):
            step()
        runs = timed_queued_calls(step, 100, "cuda", runs=5)
        ms = statistics.median(runs) * 1e3
        print(f"{args.label:5s} {method:16s} {ms:7.3f} ms  {32 / ms * 1e3:7.0f} img/s  "
              f"runs {' '.join(f'{t * 1e3:.2f}' for t in runs)}", flush=True)
        del model, result, step
        release_memory()


if __name__ == "__main__":
    main()
