"""Figures (PNG) and REPORT.md from the run folders run_all.sh writes, the paper's numbers side by side.

Wen et al., "Generalization Beyond Data Imbalance: A Controlled Study on CLIP for Transferable Insights"
(NeurIPS 2024, arXiv 2405.21070). REPORT.md opens with a sanity table (does each key run clear a floor
above chance: claims.SANITY_FLOORS), then lists each qualitative claim of the paper with the numbers measured
here and a verdict computed from them by the rule written next to it (claims.py; RULE_CHANGES: where a rule
was made to read the paper more faithfully); a run that is absent or unfinished shows as "missing" (never as
a zero) and its claims as "missing runs".

    python report.py --runs runs/quick --out report/quick

Run folders are named <experiment>_s<seed> (see run_all.sh); several seeds of one experiment are shown
as mean +- std. Every figure is written even when its runs are missing (the panel says which).
"""
import csv
import datetime
import json
import math
import os
import platform

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import classes  # noqa: E402
import metrics  # noqa: E402
import runtime  # noqa: E402
from claims import (CAPTION_RUNS, CLAIMS, DATA_RUNS, MISSING, RULE_CHANGES, TAIL_METHODS, TEXT_MODES,  # noqa: E402
                    Stat, dino_runs, first_run, fmt, load_runs, numbered, sanity_rows, scale_series, stat,
                    verdict_summary)

FREQ_PROFILES = [("IN-Caps", "incaps"), ("LAIONet (0.7)", "laionet-0.7"), ("YFCC-15M", "yfcc15m"),
                 ("CC-12M", "cc12m"), ("LAION-400M", "laion400m"), ("LAION-2B", "laion2b"),
                 ("MetaCLIP-400M", "metaclip-400m"), ("MetaCLIP-2.5B", "metaclip-fullcc")]

FIGURES = ["fig1_frequency_profiles.png", "fig3_correlation_vs_accuracy.png", "fig5_scale_text_encoder.png",
           "fig7_neural_collapse.png", "fig8_tail_accuracy.png", "fig9a_affinity.png", "fig9b_tail_classes.png",
           "fig10_dino_transfer.png"]
SECTIONS = ["Sanity", "Claims", "Fig. 1", "Fig. 3", "Fig. 4", "Fig. 5", "Fig. 6", "Fig. 7", "Fig. 8/9",
            "Fig. 10 / Table 2", "All runs"]

# Table 2 of the paper (linear probe of DINO RN50, 100 epochs), from /work/shared/reference/README.md
TABLE2_COLUMNS = ["Aircr", "Birds", "C101", "Cars", "CF10", "CF100", "DTD", "Flower", "Food", "Pets", "SUN", "VOC",
                  "Avg"]
TABLE2_TASKS = ["fgvc_aircraft", "birdsnap", "caltech101", "stanford_cars", "cifar10", "cifar100", "dtd", "flowers102",
                "food101", "oxford_pets", "sun397", "voc2007"]
TABLE2_PAPER = [
    ("ImageNet, vanilla", "65536", [27.0, 37.1, 82.3, 23.6, 86.4, 62.9, 68.7, 80.8, 55.8, 66.4, 57.0, 81.6, 60.8]),
    ("LAIONet, vanilla", "16384 (total)", [29.7, 28.2, 78.2, 22.5, 83.6, 60.7, 67.9, 78.3, 49.5, 55.0, 55.9, 76.1, 57.1]),
    ("LAIONet, vanilla", "65536", [26.7, 24.6, 77.8, 24.6, 83.5, 60.0, 67.1, 79.3, 48.6, 55.5, 55.4, 77.3, 56.7]),
    ("LAIONet, subsampled", "1024 of 65536", [30.8, 27.2, 78.6, 23.8, 83.9, 61.4, 68.1, 80.5, 50.7, 57.7, 56.0, 77.2, 58.0]),
    ("LAIONet, subsampled", "4096 of 65536", [30.3, 30.1, 78.9, 24.8, 84.6, 63.4, 69.5, 77.7, 53.3, 61.0, 56.9, 78.6, 59.1]),
    ("LAIONet, subsampled", "16384 of 65536", [32.2, 31.2, 79.4, 25.2, 85.4, 63.9, 70.2, 79.1, 54.3, 62.2, 57.7, 79.0, 60.0]),
]
# Table 1 of the paper: YFCC-15M tail classes, (frequency, CLIP zero-shot accuracy %)
TABLE1_PAPER = [(9, 46), (9, 34), (8, 44), (6, 98), (5, 14), (5, 10), (5, 44), (5, 48), (4, 42), (4, 62), (4, 52),
                (4, 50), (3, 90), (3, 88), (3, 94), (2, 100), (2, 16), (2, 12), (2, 50), (2, 22), (1, 74), (1, 82),
                (1, 0), (1, 44), (1, 72), (1, 22), (0, 6), (0, 48)]


# ======================================================================================================
# Reading per-class outputs and formatting (runs and seeds: claims.py)
# ======================================================================================================


def read_per_class(run):
    """per_class.csv of a run -> list of dicts with numbers as floats (None if absent)."""
    path = os.path.join(run["dir"], "per_class.csv")
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key != "class":
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    row[key] = float("nan")
    return rows


def read_npz(run, filename):
    path = os.path.join(run["dir"], filename)
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_rows(runs, entries, keys=("top1", "corr_acc", "corr_pred")):
    """Table rows [label, experiment, metric...] for (label, experiment) entries."""
    return [[label, f"`{exp}`"] + [fmt(stat(runs, exp, k)) for k in keys] for label, exp in entries]


def missing_panel(ax, what):
    ax.text(0.5, 0.5, f"missing:\n{what}", ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4",
            wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, out, filename):
    fig.tight_layout()
    fig.savefig(os.path.join(out, filename), dpi=110)
    plt.close(fig)


# ======================================================================================================
# Figures (one function each)
# ======================================================================================================

def figure_frequency_profiles(out):
    """Fig. 1a: per-class frequencies of the pre-training sets (sorted, log scale), from metadata/freqs."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ids = list(range(1000))
    for label, name in FREQ_PROFILES:
        counts = np.sort(classes.frequency_profile(name, ids))[::-1]
        ax.plot(np.arange(1, len(counts) + 1), np.maximum(counts, 0.5), label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("class rank (1,000 ImageNet classes)")
    ax.set_ylabel("class frequency (zero drawn at 0.5)")
    ax.set_title("Fig. 1a: class frequencies of pre-training data")
    ax.legend(fontsize=7, ncol=2)
    save(fig, out, "fig1_frequency_profiles.png")


def figure_correlation_vs_accuracy(runs, out):
    """Fig. 3: prediction-count correlation with frequency vs accuracy, CLIP caption kinds and SL vocabularies."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    series = [("CLIP", [(label, exp) for label, exp in CAPTION_RUNS], "o", "tab:blue"),
              ("SL", [(f"voc {'all' if v == 0 else int(v)}", exp) for v, exp in numbered("sl_voc", runs).items()],
               "s", "tab:orange")]
    plotted = []
    for name, entries, marker, colour in series:
        for label, exp in entries:
            x, y = stat(runs, exp, "corr_pred"), stat(runs, exp, "top1")
            if x is None or y is None:
                continue
            ax.errorbar(x.mean, y.mean, xerr=x.std, yerr=y.std, fmt=marker, color=colour,
                        label=name if name not in plotted else None)
            ax.annotate(label, (x.mean, y.mean), fontsize=7, xytext=(4, 3), textcoords="offset points")
            plotted.append(name)
    if not plotted:
        missing_panel(ax, "CLIP caption runs and SL vocabulary runs (run_all.sh --only fig3)")
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("Spearman(prediction count, class frequency)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("Fig. 3: bias vs accuracy")
    save(fig, out, "fig3_correlation_vs_accuracy.png")


def figure_scale_text_encoder(runs, out):
    """Fig. 5: accuracy and correlation vs data scale for each text-encoder mode."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    any_points = False
    for label, mode in TEXT_MODES:
        series = scale_series(runs, mode)
        for ax, key in zip(axes, ("top1", "corr_pred")):
            pts = [(f, stat(runs, exp, key)) for f, exp in series.items()]
            pts = [(f, s) for f, s in pts if s is not None]
            if pts:
                any_points = True
                ax.errorbar([f for f, _ in pts], [s.mean for _, s in pts], yerr=[s.std for _, s in pts],
                            marker="o", label=label)
    for ax, key in zip(axes, ("top-1 accuracy", "Spearman(prediction count, frequency)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fraction of the training set")
        ax.set_ylabel(key)
        if any_points:
            ax.legend(fontsize=7)
        else:
            missing_panel(ax, "clip_{scratch,frozen,finetune}_frac* (run_all.sh --only fig5)")
    fig.suptitle("Fig. 5: data scale x text encoder")
    save(fig, out, "fig5_scale_text_encoder.png")


def nc_runs(runs):
    """The runs Fig. 7 compares: CLIP with two caption kinds, CLIP with a frozen text tower, SL vocabularies."""
    entries = [("CLIP template", "clip_template"), ("CLIP title+desc+tags", "clip_title-desc-tags"),
               ("CLIP frozen text", "clip_frozen_frac1")]
    entries += [(f"SL voc {'all' if v == 0 else int(v)}", exp) for v, exp in numbered("sl_voc", runs).items()]
    return entries


def figure_neural_collapse(runs, out):
    """Fig. 7: NC1 (within-class variability), NC2 (equiangularity of class means / classifier) per run, and
    per-class NC1 against class frequency for CLIP vs SL."""
    entries = nc_runs(runs)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    for ax, key in zip(axes[:3], ("nc1", "nc2_m", "nc2_w")):
        values = [stat(runs, exp, key) for _, exp in entries]
        shown = [(label, s) for (label, _), s in zip(entries, values) if s is not None]
        if shown:
            ax.bar(range(len(shown)), [s.mean for _, s in shown], yerr=[s.std for _, s in shown],
                   color=["tab:blue" if lb.startswith("CLIP") else "tab:orange" for lb, _ in shown])
            ax.set_xticks(range(len(shown)), [lb for lb, _ in shown], rotation=60, ha="right", fontsize=7)
        else:
            missing_panel(ax, f"{key} of the CLIP / SL runs")
        ax.set_title(key.upper().replace("_", " "))
    ax = axes[3]
    plotted = False
    for label, exp, colour in (("CLIP title+desc+tags", "clip_title-desc-tags", "tab:blue"),
                               ("SL voc all", "sl_voc0", "tab:orange")):
        run = first_run(runs, exp)
        rows = read_per_class(run) if run else None
        if rows:
            freq = np.array([r["frequency"] for r in rows])
            ax.scatter(np.maximum(freq, 0.5), [r["nc1"] for r in rows], s=6, color=colour, label=label)
            plotted = True
    if plotted:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    else:
        missing_panel(ax, "per_class.csv of clip_title-desc-tags / sl_voc0")
    ax.set_xlabel("class frequency")
    ax.set_title("per-class NC1")
    fig.suptitle("Fig. 7: neural collapse of CLIP vs SL features")
    save(fig, out, "fig7_neural_collapse.png")


def figure_tail_accuracy(runs, out):
    """Fig. 8: accuracy on the trimmed tail classes vs the other classes, one-shot and zero-shot tails."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, shots in zip(axes, (1, 0)):
        entries = [(label, pattern.format(shots=shots)) for label, pattern in TAIL_METHODS]
        x = np.arange(len(entries))
        for offset, key, colour in ((-0.2, "top1_tail", "tab:red"), (0.2, "top1_other", "tab:gray")):
            stats = [stat(runs, exp, key) for _, exp in entries]
            ax.bar(x[[s is not None for s in stats]] + offset, [s.mean for s in stats if s is not None], width=0.4,
                   yerr=[s.std for s in stats if s is not None], color=colour, label=key.replace("top1_", ""))
            for xi, s in zip(x, stats):
                if s is None:
                    ax.text(xi + offset, 0.01, MISSING, rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [label.replace(" + ", "\n+ ") for label, _ in entries], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("top-1 accuracy")
        ax.set_title(f"{'one' if shots else 'zero'}-shot tail")
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 8: tail vs other classes")
    save(fig, out, "fig8_tail_accuracy.png")


def affinity_panels(runs, shots=0):
    """[(title, classnames, is_tail, matrix)] of Fig. 9a: the learned SL head, the frozen prototypes (from
    sl_tail.py's affinity.npz) and CLIP's zero-shot text classifier on the same classes (from eval.npz)."""
    panels, sample = [], None
    for title, exp in (("SL, learned head", f"sl_tail{shots}"), ("SL, frozen prototypes", f"sl-frozen_tail{shots}")):
        run = first_run(runs, exp)
        z = read_npz(run, "affinity.npz") if run else None
        if z is None:
            panels.append((title, exp, None, None, None))
            continue
        sample = sample or z
        panels.append((title, exp, [str(n) for n in z["classnames"]], z["is_tail"].astype(bool), z["affinity"]))
    run = first_run(runs, f"clip-frozen_tail{shots}")
    z = read_npz(run, "eval.npz") if run else None
    if z is not None and sample is not None and "classifier" in z:
        matrix = metrics.affinity_matrix(z["classifier"], sample["classes"])
        panels.append(("CLIP text classifier", f"clip-frozen_tail{shots}", [str(n) for n in sample["classnames"]],
                       sample["is_tail"].astype(bool), matrix))
    else:
        panels.append(("CLIP text classifier", f"clip-frozen_tail{shots}", None, None, None))
    return panels


def figure_affinity(runs, out):
    """Fig. 9a: cosine affinity between class prototypes of a class sample (tail classes first, marked *)."""
    panels = affinity_panels(runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6))
    for ax, (title, exp, names, is_tail, matrix) in zip(axes, panels):
        if matrix is None:
            missing_panel(ax, exp)
            ax.set_title(title)
            continue
        im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        labels = [("* " if t else "") + n[:14] for n, t in zip(names, is_tail)]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(labels)), labels, fontsize=5)
        ax.set_title(f"{title}\n({exp})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Fig. 9a: head affinity, zero-shot tail (* = tail class)")
    save(fig, out, "fig9a_affinity.png")


def tail_class_accuracy(runs, experiment):
    """{classname: accuracy} of the trimmed tail classes of a run (eval.npz tail_classes, per_class.csv)."""
    run = first_run(runs, experiment)
    if run is None:
        return None
    z, rows = read_npz(run, "eval.npz"), read_per_class(run)
    if z is None or rows is None or "tail_classes" not in z:
        return None
    return {rows[int(c)]["class"]: rows[int(c)]["accuracy"] for c in z["tail_classes"]}


def figure_tail_classes(runs, out):
    """Fig. 9b: accuracy of each tail class, per method (one-shot and zero-shot tails)."""
    fig, axes = plt.subplots(2, 1, figsize=(12, 7))
    for ax, shots in zip(axes, (1, 0)):
        entries = [(label, pattern.format(shots=shots)) for label, pattern in TAIL_METHODS]
        accs = [(label, tail_class_accuracy(runs, exp)) for label, exp in entries]
        names = next((list(a) for _, a in accs if a), None)
        if names is None:
            missing_panel(ax, f"runs of the {'one' if shots else 'zero'}-shot tail")
            continue
        width = 0.8 / len(accs)
        for k, (label, acc) in enumerate(accs):
            if acc:
                ax.bar(np.arange(len(names)) + (k - len(accs) / 2 + 0.5) * width,
                       [acc.get(n, np.nan) for n in names], width=width, label=label)
        ax.set_xticks(range(len(names)), [n[:16] for n in names], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{'one' if shots else 'zero'}-shot tail classes")
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 9b: per-class accuracy of the tail classes")
    save(fig, out, "fig9b_tail_classes.png")


def dino_tasks(runs):
    """Transfer tasks present in the DINO runs (Table 2's order first)."""
    tasks = []
    for _, exp in dino_runs(runs):
        for run in runs.get(exp, []):
            tasks += [t for t in (run["final"].get("probe") or {}) if t not in tasks]
    return sorted(tasks, key=lambda t: (TABLE2_TASKS.index(t) if t in TABLE2_TASKS else len(TABLE2_TASKS), t))


def figure_dino_transfer(runs, out):
    """Fig. 10: linear-probe transfer score of each DINO variant on each task, and their mean."""
    entries, tasks = dino_runs(runs), dino_tasks(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * (len(tasks) + 1) + 2), 4))
    if not tasks:
        missing_panel(ax, "dino_* runs (run_all.sh --only fig10)")
    else:
        columns = [(t, ("probe", t, "score")) for t in tasks] + [("mean", "probe_mean_score")]
        width = 0.8 / len(entries)
        for k, (label, exp) in enumerate(entries):
            stats = [stat(runs, exp, key) for _, key in columns]
            xs = np.arange(len(columns)) + (k - len(entries) / 2 + 0.5) * width
            ok = [s is not None for s in stats]
            ax.bar(xs[ok], [s.mean for s in stats if s is not None], width=width,
                   yerr=[s.std for s in stats if s is not None], label=label)
            for x, s in zip(xs, stats):
                if s is None:
                    ax.text(x, 0.01, MISSING, rotation=90, ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(columns)), [c for c, _ in columns])
        ax.set_ylabel("linear-probe score")
        ax.legend(fontsize=7)
    ax.set_title("Fig. 10: DINO linear-probe transfer")
    save(fig, out, "fig10_dino_transfer.png")


# ======================================================================================================
# REPORT.md sections
# ======================================================================================================


def section_sanity(runs):
    return ["## Sanity", "",
            "The verdicts below are read only where the experiments they compare clear these floors; a run at chance "
            "level decides nothing. Value: mean ± std over seeds (the minimum over seeds in brackets); a check "
            "passes when the mean clears the floor (floors: SANITY_FLOORS, DINO_LOSS_FLOOR and DINO_RANDOM_MARGIN "
            "in report.py).", "",
            md_table(["check", "experiment(s)", "value", "floor", "verdict"], sanity_rows(runs)), ""]


def section_claims(claims):
    rows = [[i + 1, c["figure"], c["claim"], f"**{c['verdict']}**"] for i, c in enumerate(claims)]
    changes = [f"- claim{'s' * (',' in n)} {n}: {what}. Why: {why}." for n, what, why in RULE_CHANGES]
    lines = ["## Claims", "",
             "Each claim of the paper (direction, not magnitude), the rule that decides it from the numbers below, "
             "and the verdict. 'a > b' in a rule compares means over seeds and needs the gap to exceed the larger "
             "seed standard deviation (with one seed, any gap counts). 'missing runs' = a run the rule needs is "
             "absent; 'premise not met' = what the claim builds on does not hold in our runs (counted as not "
             "supported).", "", md_table(["#", "figure", "claim", "verdict"], rows), "", verdict_summary(claims), "",
             "### Rule changes", "",
             "Where a rule now reads the paper's words more faithfully than its first version:", "", *changes, ""]
    for i, c in enumerate(claims):
        lines += [f"### {i + 1}. {c['claim']} ({c['figure']})", "", f"*Rule:* {c['rule']}", "",
                  md_table(c["header"], c["rows"]), "", f"*Verdict:* **{c['verdict']}**", ""]
    return lines


def section_fig1(runs, runs_dir):
    ids = list(range(1000))
    rows = []
    incaps = classes.frequency_profile("incaps", ids)
    for label, name in FREQ_PROFILES:
        c = classes.frequency_profile(name, ids)
        rows.append([label, f"{int(c.sum()):,}", f"{int(c.max()):,}", f"{int(np.median(c)):,}", f"{int(c.min()):,}",
                     int((c == 0).sum()), f"{metrics.correlation(incaps, c):.3f}"])
    lines = ["## Fig. 1", "", "![Fig. 1a](fig1_frequency_profiles.png)", "",
             "Class frequencies of the shipped tables (metadata/freqs; counts of the 1,000 ImageNet classes).", "",
             md_table(["data", "total", "max", "median", "min", "zero classes", "Spearman with IN-Caps"], rows), ""]
    results = os.path.join(runs_dir, "fig1_pretrained", "results.json")
    lines += ["**Fig. 1b (pre-trained open_clip models, zero-shot on ImageNet val):** "]
    if os.path.isfile(results):
        with open(results) as f:
            entries = [e for e in json.load(f) if e]
        lines += ["", md_table(["model", "pretrained", "frequency table", "top1", "corr_acc", "corr_pred"],
                                [[e["model"], e["pretrained"], e.get("freq_table"), fmt(_one(e.get("top1"))),
                                  fmt(_one(e.get("corr_acc"))), fmt(_one(e.get("corr_pred")))] for e in entries])]
        lines += ["", *section_table1(runs_dir)]
    else:
        lines += [MISSING + " (paper scale only: needs IMAGENET_VAL and cached open_clip weights).", ""]
    return lines


def _one(value):
    return Stat([value]) if isinstance(value, (int, float)) and math.isfinite(value) else None


def section_table1(runs_dir):
    """Table 1: the YFCC-15M tail classes and CLIP RN50 (YFCC-15M)'s zero-shot accuracy on them."""
    path = os.path.join(runs_dir, "fig1_pretrained", "RN50_yfcc15m", "per_class.csv")
    if not os.path.isfile(path):
        return ["Table 1 (YFCC-15M tail): " + MISSING + " (needs RN50:yfcc15m in Fig. 1b).", ""]
    rows = read_per_class(dict(dir=os.path.dirname(path)))
    rows = sorted(rows, key=lambda r: r["frequency"])[:len(TABLE1_PAPER)]
    table = [[r["class"], int(r["frequency"]), f"{100 * r['accuracy']:.0f}", f"{p[0]} / {p[1]}"]
             for r, p in zip(rows, TABLE1_PAPER)]
    return ["Table 1: the rarest YFCC-15M classes, CLIP RN50 (YFCC-15M) zero-shot accuracy, ours vs the paper's "
            "(frequency / accuracy %, paper rows in their order).", "",
            md_table(["class", "frequency", "accuracy % (ours)", "paper: freq / acc %"], table), ""]


def section_fig3(runs):
    entries = CAPTION_RUNS + [(f"SL voc {'all' if v == 0 else int(v)}", e) for v, e in numbered("sl_voc", runs).items()]
    if not numbered("sl_voc", runs):
        entries.append(("SL voc all", "sl_voc0"))
    return ["## Fig. 3", "", "![Fig. 3](fig3_correlation_vs_accuracy.png)", "",
            "CLIP with captions of growing descriptiveness and SL with vocabulary subsampling, same data.", "",
            md_table(["run", "experiment", "top1", "corr_acc", "corr_pred"], metric_rows(runs, entries)), ""]


def section_fig4(runs):
    present = [(label, exp) for label, exp in DATA_RUNS if exp in runs or exp in ("clip_title-desc-tags", "clip_laionet")]
    return ["## Fig. 4", "", "CLIP on different data distributions.", "",
            md_table(["data", "experiment", "top1", "corr_acc", "corr_pred"], metric_rows(runs, present)), ""]


def section_fig5(runs):
    entries = [(f"{label}, fraction {f:g}", exp) for label, mode in TEXT_MODES for f, exp in scale_series(runs, mode).items()]
    if not entries:
        entries = [(label, f"clip_{mode}_frac1") for label, mode in TEXT_MODES]
    return ["## Fig. 5", "", "![Fig. 5](fig5_scale_text_encoder.png)", "",
            md_table(["run", "experiment", "top1", "corr_acc", "corr_pred"], metric_rows(runs, entries)), ""]


def section_fig6(runs):
    series = numbered("clip_ow", runs) or {0.0: "clip_ow0"}
    entries = [(f"{int(n)} open-world concepts", exp) for n, exp in series.items()]
    return ["## Fig. 6", "", "CLIP with captions that also describe concepts outside the evaluated classes.", "",
            md_table(["run", "experiment", "top1", "corr_acc", "corr_pred"], metric_rows(runs, entries)), ""]


def section_fig7(runs):
    keys = ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn")
    return ["## Fig. 7", "", "![Fig. 7](fig7_neural_collapse.png)", "",
            "Neural-collapse metrics of the test features (lower NC1 = tighter classes; lower NC2 = closer to a "
            "simplex equiangular frame; _w uses the classifier / text embeddings, _nn the nearest neighbours).", "",
            md_table(["run", "experiment"] + list(keys), metric_rows(runs, nc_runs(runs), keys)), ""]


def section_fig8(runs):
    rows = []
    for shots in (1, 0):
        for label, pattern in TAIL_METHODS:
            exp = pattern.format(shots=shots)
            rows.append([f"{shots}-shot", label, f"`{exp}`"] + [fmt(stat(runs, exp, k))
                                                                 for k in ("top1_tail", "top1_other", "top1")])
    return ["## Fig. 8/9", "", "![Fig. 8](fig8_tail_accuracy.png)", "", "![Fig. 9a](fig9a_affinity.png)", "",
            "![Fig. 9b](fig9b_tail_classes.png)", "",
            md_table(["tail", "method", "experiment", "top1_tail", "top1_other", "top1"], rows), ""]


def section_fig10(runs):
    tasks = dino_tasks(runs)
    short = dict(zip(TABLE2_TASKS, TABLE2_COLUMNS))  # Table 2's column names where a task is one of its sets
    rows = []
    for label, exp in dino_runs(runs):
        util = [fmt(stat(runs, exp, ("utilisation", k)), 0) for k in ("argmax_winners", "distinct_prototypes")]
        scores = [fmt(stat(runs, exp, ("probe", t, "score")), 1, percent=True) for t in tasks]
        rows.append([label, f"`{exp}`"] + scores + [fmt(stat(runs, exp, "probe_mean_score"), 1, percent=True)] + util)
    paper = [[name, voc] + [f"{v:.1f}" for v in values] for name, voc, values in TABLE2_PAPER]
    return ["## Fig. 10 / Table 2", "", "![Fig. 10](fig10_dino_transfer.png)", "",
            "Ours, linear-probe score in % (top-1, mean per-class accuracy or 11-point mAP as each task requires; "
            "utilisation = prototypes that win the teacher's argmax over the training images / prototypes left "
            "after merging near-duplicates):", "",
            md_table(["pre-train", "experiment"] + [short.get(t, t) for t in tasks]
                     + ["Avg", "argmax winners", "distinct prototypes"], rows),
            "", "The paper's Table 2 (DINO RN50, 100 epochs, linear probe %):", "",
            md_table(["pre-train", "Voc"] + TABLE2_COLUMNS, paper), ""]


def section_all_runs(runs):
    keys = ("top1", "corr_acc", "corr_pred", "nc1", "nc2_m", "nc2_w")
    rows = []
    for exp, group in sorted(runs.items()):
        extra = []
        for k in ("voc_effective", "batch_classes_mean", "top1_tail", "probe_mean_score"):
            s = stat(runs, exp, k)
            if s is not None:
                extra.append(f"{k} {fmt(s)}")
        rows.append([f"`{exp}`", " ".join(str(r["seed"]) for r in group)] + [fmt(stat(runs, exp, k)) for k in keys]
                    + ["; ".join(extra)])
    return ["## All runs", "", md_table(["experiment", "seeds"] + list(keys) + ["other"], rows)
            if rows else "No finished runs.", ""]


def machine_description():
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # a report needs no torch to be useful
        gpu = "GPU unknown"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}"


def write_report(runs_dir, out, note=None, machine=None):
    """All figures and REPORT.md for the runs in runs_dir. Returns the claims (for callers and tests)."""
    os.makedirs(out, exist_ok=True)
    runs = load_runs(runs_dir)
    figure_frequency_profiles(out)
    figure_correlation_vs_accuracy(runs, out)
    figure_scale_text_encoder(runs, out)
    figure_neural_collapse(runs, out)
    figure_tail_accuracy(runs, out)
    figure_affinity(runs, out)
    figure_tail_classes(runs, out)
    figure_dino_transfer(runs, out)
    claims = [c(runs) for c in CLAIMS]
    n_names = sum(len(g) for g in runs.values())
    n_runs = len({os.path.realpath(r["dir"]) for g in runs.values() for r in g})  # run_all links shared runs
    header = ["# clip-beyond-tail: report", "",
              "Reproduction of Wen et al., \"Generalization Beyond Data Imbalance: A Controlled Study on CLIP for "
              "Transferable Insights\" (NeurIPS 2024, arXiv 2405.21070).", "",
              f"Runs: `{runs_dir}` ({n_runs} finished runs of {len(runs)} experiments"
              + (f"; shared ones linked under {n_names - n_runs} more name{'s' * (n_names - n_runs > 1)}"
                 if n_names > n_runs else "")
              + f"). Report written "
              f"{datetime.date.today().isoformat()} on {machine or machine_description()}."
              + (f" {note}" if note else ""),
              "Numbers are as measured; 'missing' means the run is absent or unfinished (never a zero).", ""]
    lines = header + section_sanity(runs) + section_claims(claims) + section_fig1(runs, runs_dir) \
        + section_fig3(runs) + section_fig4(runs) + section_fig5(runs) + section_fig6(runs) + section_fig7(runs) \
        + section_fig8(runs) + section_fig10(runs) + section_all_runs(runs)
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return claims


def parse_args(argv=None):
    p = runtime.ArgumentParser(prog="report.py", description="Figures and REPORT.md from run_all.sh's run folders.")
    p.add_argument("--runs", default="runs/quick", help="folder of run folders <experiment>_s<seed>/")
    p.add_argument("--out", default="report", help="where REPORT.md and the PNG figures go")
    p.add_argument("--note", default=None, help="a sentence added to the header (e.g. the wall time of the runs)")
    p.add_argument("--machine", default=None, help="machine the runs used (default: this machine)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.runs):
        raise FileNotFoundError(f"runs folder not found: {args.runs}")
    claims = write_report(args.runs, args.out, args.note, args.machine)
    print(f"wrote {os.path.join(args.out, 'REPORT.md')} and {len(FIGURES)} figures: {verdict_summary(claims)}")


if __name__ == "__main__":
    runtime.run_cli(main)
