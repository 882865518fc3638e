"""The README tables of issue 7: CLIP on the embedded default (the synthetic long-tailed world), three seeds.

  1. captions (Sec. 3.2, Fig. 3): template vs natural captions at each descriptiveness level
     (title < title+description < title+description+tags);
  2. text encoder (Sec. 3.5, Fig. 5): from scratch / initialised from a text tower pre-trained on a bigger
     synthetic corpus and frozen / initialised and fine-tuned;
  3. CLIP vs supervised learning (Fig. 1b): sl_tail.py --voc 0 on the same data.

Each cell is mean +- sample std (ddof=1) over the seeds of top1, corr_acc, corr_pred from the runs'
final.json. Runs that already have a final.json are not run again, so an interrupted benchmark continues
where it stopped; --tables-only just prints the tables.

  python benchmarks/clip_table.py                    # everything (long: see --jobs, --epochs)
  python benchmarks/clip_table.py --epochs 3 --jobs 2 --out runs/clip_table
  python benchmarks/clip_table.py --dry-run          # the commands only
  python benchmarks/clip_table.py --tables-only > clip_tables.md
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["top1", "corr_acc", "corr_pred"]

CAPTIONS = [  # (row label, clip_tail.py flags)
    ("template", ["--captions", "template"]),
    ("natural: title", ["--captions", "natural", "--caption-fields", "title"]),
    ("natural: title+description", ["--captions", "natural", "--caption-fields", "title,description"]),
    ("natural: title+description+tags", ["--captions", "natural", "--caption-fields", "title,description,tags"]),
]
# The stand-in for a pre-trained CLIP text encoder: a text tower trained (with its image tower) on a bigger
# corpus than the evaluated one: the evaluated classes plus 50 open-world concepts, about 22,500 pairs
# (1.5 x the default training set), another model seed.
PRETRAIN_FLAGS = ["--captions", "natural", "--open-world", "50", "--seed", "100"]


def experiments(args):
    """name -> (script, flags); names are folder names under --out."""
    common = ["--epochs", str(args.epochs)] if args.epochs else []
    runs = {}
    for seed in args.seeds:
        s = ["--seed", str(seed)]
        for label, flags in CAPTIONS:
            runs[f"captions/{slug(label)}/seed{seed}"] = ("clip_tail.py", flags + s + common)
        pre = os.path.join(args.out, "text_pretrain", "checkpoint.pt")
        runs[f"text/frozen/seed{seed}"] = ("clip_tail.py", ["--text-init", pre, "--lock-text"] + s + common)
        runs[f"text/finetuned/seed{seed}"] = ("clip_tail.py", ["--text-init", pre] + s + common)
        sl_epochs = ["--epochs", str(args.sl_epochs)] if args.sl_epochs else []
        runs[f"sl/voc0/seed{seed}"] = ("sl_tail.py", ["--voc", "0"] + s + sl_epochs)
    runs["text_pretrain"] = ("clip_tail.py", PRETRAIN_FLAGS + common)
    return runs


def slug(label):
    return label.replace("natural: ", "natural-").replace("+", "-").replace(" ", "")


def tables(args):
    def cell(name_fmt, metric):
        values = []
        for seed in args.seeds:
            path = os.path.join(args.out, name_fmt.format(seed=seed), "final.json")
            if os.path.isfile(path):
                with open(path) as f:
                    value = json.load(f).get(metric)
                if value is not None:
                    values.append(value)
        if not values:
            return "n/a"
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
        note = "" if len(values) == len(args.seeds) else f" ({len(values)} seeds)"
        return f"{mean:.3f} ± {std:.3f}{note}"

    def table(title, rows):
        lines = [f"#### {title}", "", "| run | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
        for label, name_fmt in rows:
            lines.append(f"| {label} | " + " | ".join(cell(name_fmt, m) for m in METRICS) + " |")
        return "\n".join(lines) + "\n"

    natural = f"captions/{slug(CAPTIONS[-1][0])}/seed{{seed}}"
    out = [table("Captions (Sec. 3.2, Fig. 3)", [(label, f"captions/{slug(label)}/seed{{seed}}") for label, _ in CAPTIONS]),
           table("Text encoder (Sec. 3.5, Fig. 5), natural captions (title+description+tags)",
                 [("scratch", natural), ("pre-trained, frozen", "text/frozen/seed{seed}"),
                  ("pre-trained, fine-tuned", "text/finetuned/seed{seed}")]),
           table("CLIP vs supervised learning (Fig. 1b)",
                 [("SL, sl_tail.py --voc 0", "sl/voc0/seed{seed}"), ("CLIP, template captions", f"captions/{slug(CAPTIONS[0][0])}/seed{{seed}}"),
                  ("CLIP, natural captions", natural)])]
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "clip_table"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="clip_tail.py epochs (default: its recipe's)")
    p.add_argument("--sl-epochs", type=int, default=None, help="sl_tail.py epochs (default: its recipe's)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each with OMP_NUM_THREADS=threads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--tables-only", action="store_true", help="print the tables from existing runs")
    args = p.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    runs = experiments(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))

    def command(name):
        script, flags = runs[name]
        return [sys.executable, os.path.join(REPO, script), *flags, "--out", os.path.join(args.out, name)]

    def run(name):
        out = os.path.join(args.out, name)
        if os.path.isfile(os.path.join(out, "final.json")):
            return name, 0.0, "done before"
        resume = ["--resume"] if os.path.isfile(os.path.join(out, "checkpoint.pt")) else []
        os.makedirs(os.path.dirname(out), exist_ok=True)
        start = time.time()
        with open(out + ".log", "w") as log:
            proc = subprocess.run(command(name) + resume, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode}, see {out}.log)"
        print(f"{time.time() - start:7.0f}s  {name}  {status}", flush=True)
        return name, time.time() - start, status

    if args.dry_run:
        for name in runs:
            print(" ".join(command(name)))
        return
    if not args.tables_only:
        started = time.time()
        first = [n for n in runs if n == "text_pretrain"]  # the frozen / fine-tuned runs need it
        with ThreadPoolExecutor(args.jobs) as pool:
            pending = [pool.submit(run, n) for n in first]
            pending += [pool.submit(run, n) for n in runs if n not in first and not n.startswith("text/")]
            [f.result() for f in pending[:len(first)]]
            pending += [pool.submit(run, n) for n in runs if n.startswith("text/")]
            results = [f.result() for f in pending]
        failed = [n for n, _, s in results if s.startswith("FAILED")]
        print(f"\n{len(results)} runs, {time.time() - started:.0f}s wall, {len(failed)} failed {failed or ''}\n")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"Measured {datetime.date.today().isoformat()} at commit {commit} on {platform.machine()} ({os.cpu_count()} cores, "
          f"{'no GPU' if not has_gpu() else 'GPU present'}); seeds {args.seeds}; epochs "
          f"{args.epochs or 'recipe default'}; runs in {args.out}\n")
    print(tables(args))


def has_gpu():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
