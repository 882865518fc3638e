"""The README's DINO table (Sec. 4.2 / Table 2 on the embedded default): linear-probe transfer of vanilla DINO
on the long-tailed (LAIONet-profile) world, DINO with prototype subsampling, a plain smaller head, and vanilla
DINO on a balanced world of the same size, over several seeds, next to the paper's Table 2 direction.

    python benchmarks/dino_table.py                          # 4 variants x seeds 0,1,2, default recipe
    python benchmarks/dino_table.py --jobs 2 -- --epochs 3   # flags after -- go to every dino_tail.py run

Runs go to --root/<variant>_s<seed>/ (a finished run, i.e. one with final.json, is reused; an interrupted
one is resumed). Prints a Markdown table: mean +- std over seeds of each transfer task's probe score, their
average, and the prototype utilisation (teacher-argmax winners, distinct prototypes after merging
near-duplicates), plus the wall time, machine and date.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, what it is, its dino_tail.py flags given K prototypes, the small head's size and the subset size)
VARIANTS = [
    ("balanced", "balanced world, vanilla", lambda k, small, v: ["--profile", "uniform", "--prototypes", str(k)]),
    ("vanilla", "long-tailed world, vanilla", lambda k, small, v: ["--prototypes", str(k)]),
    ("small-head", "long-tailed world, plain smaller head", lambda k, small, v: ["--prototypes", str(small)]),
    ("subsampled", "long-tailed world, subsampled", lambda k, small, v: ["--prototypes", str(k), "--voc", str(v)]),
]
# Table 2 of the paper: average linear-probe accuracy over 12 downstream sets (DINO RN50, 100 epochs)
PAPER = {"balanced": ("ImageNet, vanilla, 65536", 60.8), "vanilla": ("LAIONet, vanilla, 65536", 56.7),
         "small-head": ("LAIONet, vanilla, 16384 (total)", 57.1),
         "subsampled": ("LAIONet, subsampled 16384 of 65536", 60.0)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.path.join(REPO, "runs", "dino_table"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--prototypes", type=int, default=4096, help="K of the vanilla and subsampled heads")
    p.add_argument("--small", type=int, default=1024, help="K of the plain smaller head")
    p.add_argument("--voc", type=int, default=1024, help="prototypes drawn per iteration when subsampling")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each single-threaded when > 1)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("extra", nargs="*", help="flags for every dino_tail.py run (after --)")
    return p.parse_args()


def run_all(args):
    pending = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, _, flags in VARIANTS:
            out = os.path.join(args.root, f"{name}_s{seed}")
            if os.path.exists(os.path.join(out, "final.json")):
                continue
            cmd = [args.python, os.path.join(REPO, "dino_tail.py"), "--out", out, "--seed", str(seed)]
            cmd += flags(args.prototypes, args.small, args.voc) + list(args.extra)
            if os.path.exists(os.path.join(out, "checkpoint.pt")):
                cmd.append("--resume")
            pending.append((out, cmd))
    env = dict(os.environ)
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    running = []
    while pending or running:
        while pending and len(running) < args.jobs:
            out, cmd = pending.pop(0)
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "stdout.log"), "a")
            print("running: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
            running.append((out, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for out, proc in list(running):
            if proc.poll() is not None:
                running.remove((out, proc))
                if proc.returncode:
                    print(f"failed ({proc.returncode}): {out} (see its stdout.log)", file=sys.stderr, flush=True)


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(args, wall):
    finals = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, _, _ in VARIANTS:
            path = os.path.join(args.root, f"{name}_s{seed}", "final.json")
            if os.path.exists(path):
                finals.setdefault(name, []).append(json.load(open(path)))
    tasks = sorted({t for runs in finals.values() for r in runs for t in r.get("probe", {})})
    header = ["pre-training", "K", "V"] + [f"probe {t}" for t in tasks] + ["probe mean", "argmax winners",
                                                                          "distinct protos", "seeds",
                                                                          "paper (Table 2)", "paper avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, label, _ in VARIANTS:
        runs = finals.get(name, [])
        if not runs:
            continue
        k, v = runs[0].get("prototypes"), runs[0].get("voc") or runs[0].get("prototypes")
        cells = [label, str(k), str(v)]
        cells += [mean_std([r["probe"].get(t, {}).get("score") for r in runs]) for t in tasks]
        cells.append(mean_std([r.get("probe_mean_score") for r in runs]))
        for key in ("argmax_winners", "distinct_prototypes"):
            vals = [r["utilisation"][key] for r in runs]
            cells.append(f"{statistics.mean(vals):.0f}" + (f" ± {statistics.stdev(vals):.0f}" if len(vals) > 1 else ""))
        cells += [str(len(runs)), PAPER[name][0], f"{PAPER[name][1]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    extra = " ".join(args.extra) or "(none)"
    print(f"\nProbe scores in % (mean ± std over seeds {args.seeds}); dino_tail.py default recipe plus: {extra}. "
          f"Measured {datetime.date.today()} on {platform.machine()} CPU ({os.cpu_count()} cores, no GPU); "
          f"wall time of this invocation {wall / 60:.1f} min.")


def main():
    args = parse_args()
    start = time.time()
    run_all(args)
    table(args, time.time() - start)


if __name__ == "__main__":
    main()
