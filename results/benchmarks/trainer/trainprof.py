"""Where a trainer epoch's time goes (NVIDIA_H200.md): ms a step per epoch, the main thread's time in
_save_checkpoint, and for a variant named *prof* a torch.profiler window of epochs 6-7.

    PYTHONPATH=src python3 trainprof.py SPEC.json base,prof[,nockpt,noclip_nockpt,swi] LABEL-

SPEC: a training spec as `mambapeft train --spec` takes (train.json's `config`); a CUDA device. $OUT (or
/tmp) receives kernels_<label>.txt and trace_<label>.json.
"""
import copy, json, os, shutil, statistics, sys, time
import torch
from mambapeft.train import checkpoint_writer
from mambapeft.train.runner import Trainer

writes = []  # seconds each checkpoint's write took (on the writer's thread)
_write = checkpoint_writer.torch_save_verifiable
def timed_write(state, path):
    a = time.perf_counter(); _write(state, path); writes.append(time.perf_counter() - a)
checkpoint_writer.torch_save_verifiable = timed_write

base = json.load(open(sys.argv[1]))
variants = sys.argv[2].split(",")
tag = sys.argv[3] if len(sys.argv) > 3 else ""
out = os.environ.get("OUT", "/tmp")

def run(name):
    label = tag + name
    spec = copy.deepcopy(base)
    spec["output_dir"] = f"/tmp/run_{name}"
    shutil.rmtree(spec["output_dir"], ignore_errors=True)
    if "noclip" in name: spec["train"]["grad_clip_norm"] = 0
    if "nockpt" in name: spec["train"]["checkpoint_every"] = 1000
    sys.setswitchinterval(2e-4 if "swi" in name else 5e-3)  # the GIL's hand-over interval (CPython's default 5 ms)
    t = Trainer(spec)
    marks, saves = [], []
    writes.clear()
    orig_save = t._save_checkpoint
    def save(state):
        torch.cuda.synchronize(); a = time.perf_counter()
        orig_save(state); b = time.perf_counter()
        saves.append(b - a)
    t._save_checkpoint = save
    orig_step = t._step
    prof = None
    ipe = t.task.iters_per_epoch
    def step(state, check):
        nonlocal prof
        if state.step % ipe == 0:
            torch.cuda.synchronize(); marks.append((state.step, time.perf_counter()))
            if "prof" in name and state.step == 6 * ipe:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
            if prof is not None and state.step == 8 * ipe:
                prof.__exit__(None, None, None); report(prof, label, 2 * ipe); prof = None
        return orig_step(state, check)
    t._step = step
    t0 = time.perf_counter(); state = t.train(); torch.cuda.synchronize(); marks.append((state.step, time.perf_counter()))
    per = [(b[1] - a[1]) / (b[0] - a[0]) * 1e3 for a, b in zip(marks, marks[1:])]
    print(f"{label}: ms/step per epoch {[round(x, 2) for x in per]}; median epochs 3+: {statistics.median(per[3:]):.2f}; "
          f"ckpt save ms {[round(s * 1e3, 1) for s in saves[:6]]}; {len(writes)} writes of ms {[round(w * 1e3) for w in writes[:6]]}; train_seconds {state.train_seconds:.2f}; wall {time.perf_counter() - t0:.2f}", flush=True)

def report(prof, name, steps):
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    tot = {}
    for e in events:
        tot.setdefault(e.name, [0, 0]); tot[e.name][0] += e.device_time_total; tot[e.name][1] += 1
    rows = sorted(tot.items(), key=lambda kv: -kv[1][0])
    with open(f"{out}/kernels_{name}.txt", "w") as f:
        for k, (us, n) in rows:
            f.write(f"{us / steps:9.1f} us/step {n / steps:7.1f} calls/step  {k[:150]}\n")
    print(f"{name}: total kernel time {sum(v[0] for v in tot.values()) / steps / 1e3:.2f} ms/step over {steps} steps")
    prof.export_chrome_trace(f"{out}/trace_{name}.json")
    # GPU busy union and the largest idle gaps
    iv = sorted((e.time_range.start, e.time_range.end, e.name) for e in events)
    busy, gaps, cur_s, cur_e, last = 0, [], iv[0][0], iv[0][1], iv[0][2]
    for s, e, n in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s; gaps.append((s - cur_e, last[:60], n[:60])); cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
        last = n if e >= cur_e else last
    busy += cur_e - cur_s
    span = iv[-1][1] - iv[0][0]
    print(f"{name}: GPU span {span / steps / 1e3:.2f} ms/step, busy {busy / steps / 1e3:.2f}, idle {(span - busy) / steps / 1e3:.2f}; gaps>20us: "
          f"{sum(1 for g in gaps if g[0] > 20) / steps:.1f}/step summing {sum(g[0] for g in gaps if g[0] > 20) / steps / 1e3:.2f} ms/step")
    agg = {}
    for g, a, b in gaps:
        if g > 5:
            agg.setdefault((a, b), [0, 0]); agg[(a, b)][0] += g; agg[(a, b)][1] += 1
    for (a, b), (g, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"   gap {g / steps:8.1f} us/step ({n / steps:.1f}/step) after {a} | before {b}")

for v in variants:
    run(v)
