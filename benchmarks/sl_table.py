"""The sl_tail.py table of the README (issue 6): on the embedded synthetic world, supervised learning with
all classes in the softmax (--voc 0) vs vocabulary subsampling (--voc 10, 20, 50), and, on a zero-shot
tail (--trim-tail 20 --tail-shots 0), the frozen CLIP RN50 head with and without subsampling (Sec. 3.3,
4.1). Runs sl_tail.py once per setting and seed (a finished run is kept, a killed one resumed), then prints
Markdown tables of mean +- std over the seeds, read from each run's final.json.

    python benchmarks/sl_table.py                            # default recipe, 3 seeds, then the tables
    python benchmarks/sl_table.py --jobs 2 --epochs 2        # two runs at a time, shorter schedule
    python benchmarks/sl_table.py --table-only               # print the tables of the runs already there
    python benchmarks/sl_table.py --dry-run                  # list the commands
    python benchmarks/sl_table.py -- --num-train 3000        # anything after -- goes to every run
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings(args):
    """(table, row label, run name, sl_tail flags) of every setting, in table order."""
    rows = [("voc", "all classes (`--voc 0`)", "voc0", ["--voc", "0"])]
    rows += [("voc", f"`--voc {v}`", f"voc{v}", ["--voc", str(v)]) for v in args.vocs]
    tail = ["--trim-tail", str(args.trim), "--tail-shots", "0"]
    frozen = ["--head", "frozen", "--head-file", args.head]
    rows += [("tail", "learned head, `--voc 0`", "tail_learned_voc0", [*tail, "--voc", "0"]),
             ("tail", f"frozen {args.head} head, `--voc 0`", "tail_frozen_voc0", [*tail, *frozen, "--voc", "0"]),
             ("tail", f"frozen {args.head} head, `--voc {args.tail_voc}`", f"tail_frozen_voc{args.tail_voc}",
              [*tail, *frozen, "--voc", str(args.tail_voc)])]
    return rows


def command(args, flags, seed, out):
    cmd = [sys.executable, os.path.join(REPO, "sl_tail.py"), *flags, "--seed", str(seed), "--out", out]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    cmd += args.extra
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        cmd.append("--resume")
    return cmd


def run_one(args, cmd, out):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    start = time.time()
    with open(out + ".log", "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {out}.log)"
    print(f"{os.path.basename(out)}: {status} in {time.time() - start:.0f}s", flush=True)
    return proc.returncode


def mean_std(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table(args, rows, kind, columns):
    lines = ["| setting | " + " | ".join(columns) + " | seeds |", "|---" * (len(columns) + 2) + "|"]
    for row_kind, label, name, _ in rows:
        if row_kind != kind:
            continue
        finals = []
        for seed in args.seeds:
            path = os.path.join(args.out_root, f"{name}_s{seed}", "final.json")
            if os.path.exists(path):
                with open(path) as f:
                    finals.append(json.load(f))
        cells = [mean_std([f.get(c) for f in finals], 1 if c == "voc_effective" else 3) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(finals)} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-root", default=os.path.join(REPO, "runs", "sl_table"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--vocs", default="10,20,50")
    p.add_argument("--epochs", type=int, default=None, help="override the default recipe's epochs")
    p.add_argument("--trim", type=int, default=20, help="zero-shot tail: classes cut to 0 shots")
    p.add_argument("--tail-voc", type=int, default=20)
    p.add_argument("--head", default="clip-rn50")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.vocs = [int(v) for v in args.vocs.split(",")]
    rows = settings(args)

    if not args.table_only:
        todo = []
        for _, _, name, flags in rows:
            for seed in args.seeds:
                out = os.path.join(args.out_root, f"{name}_s{seed}")
                if os.path.exists(os.path.join(out, "final.json")):
                    continue
                todo.append((command(args, flags, seed, out), out))
        for cmd, _ in todo:
            print(shlex.join(cmd))
        if args.dry_run:
            return
        start = time.time()
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            codes = list(pool.map(lambda job: run_one(args, *job), todo))
        print(f"{len(todo)} runs in {(time.time() - start) / 60:.1f} min wall, {sum(c != 0 for c in codes)} failed")

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = f"{os.cpu_count()}-core {platform.machine().replace('_', '-')} CPU, {gpu}"
    print(f"\nsl_tail.py on the embedded synthetic world; {machine}; "
          f"{datetime.date.today().isoformat()}; epochs: {args.epochs or 'recipe default'}; extra flags: "
          f"{shlex.join(args.extra) or 'none'}; mean ± std over seeds {','.join(map(str, args.seeds))}\n")
    print(table(args, rows, "voc", ["voc_effective", "top1", "corr_acc", "corr_pred"]))
    print(f"\nZero-shot tail (`--trim-tail {args.trim} --tail-shots 0`):\n")
    print(table(args, rows, "tail", ["top1", "top1_tail", "top1_other", "corr_pred"]))


if __name__ == "__main__":
    main()
