"""The paper's qualitative claims, decided from the runs run_all.sh writes: reading the run folders and
aggregating seeds (mean +- std), the Sanity floors each experiment must clear before its verdicts mean
anything, and one function per claim with the rule it applies (report.py lays them out in REPORT.md).

Wen et al., "Generalization Beyond Data Imbalance: A Controlled Study on CLIP for Transferable Insights"
(NeurIPS 2024, arXiv 2405.21070). A verdict reads direction, not magnitude: 'a > b' compares means over
seeds and needs the gap to exceed the larger seed standard deviation. RULE_CHANGES lists where a rule was
made to read the paper's words more faithfully than its first version.
"""
import json
import math
import os
import re

import numpy as np

import metrics

MISSING = "missing"
# "premise not met": what the claim builds on does not hold in our runs (counted as not supported)
VERDICTS = ("supported", "not supported", "missing runs", "premise not met")

# ---- The experiments run_all.sh names (one place) ---------------------------------------------------
CAPTION_RUNS = [("template", "clip_template"), ("title", "clip_title"),
                ("title+description", "clip_title-desc"), ("title+description+tags", "clip_title-desc-tags")]
DATA_RUNS = [("IN-Caps", "clip_title-desc-tags"), ("LAIONet", "clip_laionet"),
             ("LAIONet =freq (IN-Caps)", "clip_laionet-freqmatch"),
             ("LAIONet, more diverse (synthetic)", "clip_laionet-diverse"), ("YFCC-15M-Cls", "clip_yfcc")]
TEXT_MODES = [("from scratch", "scratch"), ("pre-trained, frozen", "frozen"), ("pre-trained, fine-tuned", "finetune")]
TAIL_METHODS = [("CLIP, frozen text tower", "clip-frozen_tail{shots}"), ("SL", "sl_tail{shots}"),
                ("SL + frozen prototypes", "sl-frozen_tail{shots}"),
                ("SL + frozen prototypes + voc. subsampling", "sl-frozen-voc_tail{shots}")]
DINO_RANDOM = "dino_random"  # DINO's backbone with no pre-training: the floor pre-training must clear

# ---- Sanity floors (REPORT.md's first section): a run at chance level decides nothing ------------------
# (check, experiment, final.json key, floor): passes when the mean over seeds reaches the floor.
SANITY_FLOORS = [
    ("SL over all classes", "sl_voc0", "top1", 0.30),
    ("CLIP, template captions", "clip_template", "top1", 0.25),
    ("CLIP, natural captions (all fields)", "clip_title-desc-tags", "top1", 0.15),
    ("stand-in for the pre-trained text encoder, its own zero-shot (quick/smoke modes only)", "clip_textpre", "top1",
     0.30),
    ("CLIP, frozen stand-in text tower, full data", "clip_frozen_frac1", "top1", 0.15),
    ("CLIP, frozen text tower, zero-shot tail (5x chance of 100 classes)", "clip-frozen_tail0", "top1_tail", 0.05),
]
# every DINO pre-training run: final_loss <= 0.9 ln K (ln K: a uniform teacher over the K prototypes an
# iteration uses: V of them with --voc V), and probe_mean_score >= dino_random's + 0.05 (5 points)
DINO_LOSS_FLOOR = 0.9
DINO_RANDOM_MARGIN = 0.05


# ---- Reading runs and aggregating seeds -------------------------------------------------------------------

def load_runs(runs_dir):
    """{experiment: [run, ...]} for every folder <experiment>_s<seed> (or <experiment>) holding final.json.
    run = dict(name, seed, dir, final, args); unfinished folders are left out (they show as missing)."""
    runs = {}
    if not os.path.isdir(runs_dir):
        return runs
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name)
        final_path = os.path.join(path, "final.json")
        if not os.path.isfile(final_path):
            continue
        m = re.fullmatch(r"(.+)_s(\d+)", name)
        experiment, seed = (m.group(1), int(m.group(2))) if m else (name, 0)
        with open(final_path) as f:
            final = json.load(f)
        args = {}
        if os.path.isfile(os.path.join(path, "args.json")):
            with open(os.path.join(path, "args.json")) as f:
                args = json.load(f)
        runs.setdefault(experiment, []).append(dict(name=name, seed=seed, dir=path, final=final, args=args))
    for group in runs.values():
        group.sort(key=lambda r: r["seed"])
    return runs


def lookup(final, key):
    """final[key] for a key, or a nested value for a tuple key such as ("probe", "novel", "score")."""
    value = final
    for part in key if isinstance(key, tuple) else (key,):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class Stat:
    """A metric over the seeds of one experiment: mean, std (0 for one seed), n."""

    def __init__(self, values):
        self.values = list(values)
        self.n = len(self.values)
        self.mean = float(np.mean(self.values))
        self.std = float(np.std(self.values, ddof=1)) if self.n > 1 else 0.0

    def __repr__(self):
        return f"Stat({self.mean:.4f} +- {self.std:.4f}, n={self.n})"


def stat(runs, experiment, key):
    """Stat of final[key] over the seeds of `experiment`, or None when no finished run has a number."""
    values = []
    for run in runs.get(experiment, []):
        v = lookup(run["final"], key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            values.append(float(v))
    return Stat(values) if values else None


def fmt(s, digits=3, percent=False):
    """'0.512', '0.512 +- 0.010 (3 seeds)' or 'missing'."""
    if s is None:
        return MISSING
    scale = 100 if percent else 1
    text = f"{s.mean * scale:.{digits}f}"
    return text + (f" ± {s.std * scale:.{digits}f} ({s.n} seeds)" if s.n > 1 else "")


def greater(a, b):
    """a > b for the verdicts: the means differ by more than the larger seed std (by anything with one seed)."""
    return a.mean - b.mean > max(a.std, b.std)


def first_run(runs, experiment):
    group = runs.get(experiment, [])
    return group[0] if group else None


def numbered(prefix, runs, suffix=""):
    """{number: experiment} for experiments named <prefix><number><suffix> (e.g. sl_voc20, clip_ow100)."""
    found = {}
    for name in runs:
        m = re.fullmatch(re.escape(prefix) + r"([0-9.]+)" + re.escape(suffix), name)
        if m:
            found[float(m.group(1))] = name
    return dict(sorted(found.items()))


def num_classes(runs, experiment):
    run = first_run(runs, experiment)
    return None if run is None else run["final"].get("num_classes")


def scale_series(runs, mode):
    """{fraction: experiment} of Fig. 5's runs for one text-encoder mode."""
    return numbered(f"clip_{mode}_frac", runs)


def dino_runs(runs):
    """[(label, experiment)] of Fig. 10 in Table 2's order, after the random backbone (what pre-training adds)."""
    entries = [("random backbone, no pre-training", DINO_RANDOM), ("balanced, vanilla", "dino_balanced"),
               ("imbalanced, small head", "dino_small-head"), ("imbalanced, vanilla", "dino_vanilla")]
    entries += [(f"imbalanced, subsampled {int(v)}", exp) for v, exp in numbered("dino_voc", runs).items()]
    return entries


# ---- The claims (one function each): dict(claim, figure, rule, measured rows, verdict) --------------------

def claim(figure, text, rule, header, rows, verdict):
    """One claim of the paper: the measured numbers (a table: header, rows) and the verdict of its rule."""
    assert verdict in VERDICTS, verdict
    return dict(figure=figure, claim=text, rule=rule, header=header, rows=rows, verdict=verdict)


def verdict_of(condition, premise=True):
    """None -> missing runs; True/False -> supported / not supported; premise False -> premise not met (a
    premise that fails decides even when the rule's other runs are missing; a premise of None -> missing runs)."""
    if premise is False:
        return VERDICTS[3]
    if premise is None or condition is None:
        return VERDICTS[2]
    return VERDICTS[0] if condition else VERDICTS[1]


def subsampled_sl(runs):
    """{V: experiment} of the SL runs with a subsampled vocabulary (V > 0), smallest first."""
    return {int(v): exp for v, exp in numbered("sl_voc", runs).items() if v > 0}


def claim_sl_more_biased(runs, margin=0.1):
    sl = stat(runs, "sl_voc0", "corr_pred")
    clip = {label: stat(runs, exp, "corr_pred") for label, exp in CAPTION_RUNS}
    rows = [["SL, all classes", "`sl_voc0`", fmt(sl)]]
    rows += [[f"CLIP, {label} captions", f"`{exp}`", fmt(clip[label])] for label, exp in CAPTION_RUNS]
    ok = None  # every caption variant is needed: a verdict on some of them would be a different claim
    if sl is not None and None not in clip.values():
        ok = all(sl.mean - s.mean > margin + max(sl.std, s.std) for s in clip.values())
    return claim("Fig. 1b / 3a", "Supervised learning's per-class prediction counts correlate with class frequency "
                 "far more than CLIP's.",
                 f"SL's Spearman(prediction count, frequency) exceeds that of every CLIP caption variant by "
                 f"more than {margin} (plus the larger seed std).", ["run", "experiment", "corr_pred"], rows,
                 verdict_of(ok))


def claim_voc_close_to_template_clip(runs):
    clip, full = stat(runs, "clip_template", "corr_pred"), stat(runs, "sl_voc0", "corr_pred")
    sub = subsampled_sl(runs)
    smallest = min(sub, default=None)
    small = stat(runs, sub[smallest], "corr_pred") if sub else None
    rows = [["CLIP, template captions", "`clip_template`", fmt(clip)], ["SL, all classes", "`sl_voc0`", fmt(full)],
            [f"SL, voc {smallest}" if sub else "SL, smallest voc", f"`{sub[smallest]}`" if sub else "`sl_voc<V>`",
             fmt(small)]]
    ok = None
    if None not in (clip, full, small):
        ok = abs(small.mean - clip.mean) <= 0.5 * abs(full.mean - clip.mean)
    return claim("Fig. 3a", "Subsampling SL's vocabulary to a small size (~10% of the classes) brings SL close to "
                 "template-based CLIP.",
                 "With the smallest vocabulary, SL's Spearman(prediction count, frequency) is at most half as far from "
                 "template-based CLIP's as SL with all classes is.", ["run", "experiment", "corr_pred"], rows,
                 verdict_of(ok))


def claim_smaller_voc_debias(runs):
    points = [(v, exp) for v, exp in subsampled_sl(runs).items()]
    if "sl_voc0" in runs:
        points.append((num_classes(runs, "sl_voc0") or max([v for v, _ in points], default=0) + 1, "sl_voc0"))
    # the vocabulary a run really competed over: the batch's classes when they outnumber V (voc_effective)
    points = [(v, exp, stat(runs, exp, "voc_effective"), stat(runs, exp, "corr_pred")) for v, exp in points]
    rows = [[v, f"`{exp}`", fmt(eff, 1), fmt(s)] for v, exp, eff, s in points]
    sub = subsampled_sl(runs)
    full, small = stat(runs, "sl_voc0", "corr_pred"), stat(runs, sub[min(sub)], "corr_pred") if sub else None
    points = [(eff.mean if eff else v, s) for v, _, eff, s in points if s is not None]
    ok = None
    if len(points) >= 3 and None not in (full, small):
        rho = metrics.correlation(np.array([v for v, _ in points], float), np.array([s.mean for _, s in points]))
        rows.append([f"all classes - voc {min(sub)} (> larger seed std {max(full.std, small.std):.3f})", "", "",
                     f"{full.mean - small.mean:.3f}"])
        rows.append(["Spearman(effective V, corr_pred)", "", "", f"{rho:.3f}"])
        ok = rho >= 0.8 - 1e-9 and greater(full, small)  # (float rounding of an exact 0.8)
    return claim("Fig. 3a", "Smaller vocabularies de-bias SL more.",
                 "Over at least three vocabulary sizes (all classes = C), Spearman(effective vocabulary size, SL's "
                 "Spearman(prediction count, frequency)) >= 0.8, and SL with all classes has a higher Spearman("
                 "prediction count, frequency) than with the smallest vocabulary (a > b); the effective size is the "
                 "mean number of classes an iteration competed over (voc_effective: the batch's classes when they "
                 "outnumber V).",
                 ["V", "experiment", "effective V", "corr_pred"], rows, verdict_of(ok))


def claim_intermediate_voc_accuracy(runs):
    full = stat(runs, "sl_voc0", "top1")
    middle = list(subsampled_sl(runs).items())[1:]  # every subsampled size but the smallest
    stats = [(v, exp, stat(runs, exp, "top1")) for v, exp in middle]
    rows = [["all classes", "`sl_voc0`", fmt(full)]] + [[v, f"`{exp}`", fmt(s)] for v, exp, s in stats]
    stats = [s for _, _, s in stats if s is not None]
    ok = None if full is None or not stats else any(greater(s, full) for s in stats)
    return claim("Fig. 3a", "Intermediate vocabulary sizes also raise SL's accuracy.",
                 "Some vocabulary size between the smallest and all classes has a higher top-1 than SL with all "
                 "classes.", ["V", "experiment", "top1"], rows, verdict_of(ok))


def claim_descriptive_captions(runs):
    order = CAPTION_RUNS[1:]  # title < title+description < title+description+tags
    corr = [stat(runs, exp, "corr_pred") for _, exp in order]
    top1 = [stat(runs, exp, "top1") for _, exp in order]
    rows = [[label, f"`{exp}`", fmt(a), fmt(c)] for (label, exp), a, c in zip(order, top1, corr)]
    rho = None if None in corr else metrics.correlation(np.arange(len(order), dtype=float), [c.mean for c in corr])
    rows.append(["Spearman(rank in the order, corr_pred), information only", "", "",
                 MISSING if rho is None else f"{rho:.3f}"])
    ends = (corr[0], corr[-1], top1[0], top1[-1])  # "roughly monotonic": the ends of the order decide
    ok = None if None in ends else greater(corr[0], corr[-1]) and greater(top1[-1], top1[0])
    return claim("Fig. 3", "More descriptive captions (title < title+description < title+description+tags) lower "
                 "CLIP's correlation and raise its accuracy.",
                 "From title to title+description+tags (the ends of the order; the paper calls the trend roughly "
                 "monotonic), Spearman(prediction count, frequency) decreases and top-1 increases (a > b both).",
                 ["captions", "experiment", "top1", "corr_pred"], rows, verdict_of(ok))


def all_scales(runs):
    """The data fractions any text-encoder mode of Fig. 5 has: every mode should have all of them."""
    return sorted({f for _, mode in TEXT_MODES for f in scale_series(runs, mode)})


def claim_more_data(runs):
    rows, checks, scales = [], [], all_scales(runs)
    for label, mode in TEXT_MODES:
        series = scale_series(runs, mode)
        pts = [(f, series.get(f), stat(runs, series[f], "top1") if f in series else None,
                stat(runs, series[f], "corr_pred") if f in series else None) for f in scales]
        rows += [[label, f"{f:g}", f"`{exp}`" if exp else MISSING, fmt(a), fmt(c)] for f, exp, a, c in pts]
        if len(pts) < 2 or any(a is None or c is None for _, _, a, c in pts):
            checks.append(None)  # a mode without every scale (the smallest and largest above all)
            continue
        (_, _, a0, c0), (_, _, a1, c1) = pts[0], pts[-1]
        checks.append(greater(a1, a0) and greater(c0, c1))
    ok = None if None in checks or not checks else all(checks)
    return claim("Fig. 5", "More data lowers the correlation and raises the accuracy together.",
                 "For every text-encoder mode, measured at the same two or more data scales, the largest scale has a "
                 "higher top-1 and a lower Spearman(prediction count, frequency) than the smallest.",
                 ["text encoder", "fraction", "experiment", "top1", "corr_pred"], rows, verdict_of(ok))


def compare_modes(runs, better, worse, key="top1"):
    """[(fraction, `key` Stat of `better`, of `worse`)] at every data scale of Fig. 5 (None where a mode lacks
    it: the claims then say 'missing runs' rather than judge on the scales that happen to be there)."""
    a, b = scale_series(runs, better), scale_series(runs, worse)
    value = lambda series, f: stat(runs, series[f], key) if f in series else None
    return [(f, value(a, f), value(b, f)) for f in all_scales(runs)]


def claim_frozen_text_helps(runs):
    top1, corr = compare_modes(runs, "frozen", "scratch"), compare_modes(runs, "frozen", "scratch", "corr_pred")
    rows = [[f"{f:g}", fmt(a), fmt(b), fmt(c), fmt(d)] for (f, a, b), (_, c, d) in zip(top1, corr)]
    quads = [(a, b, c, d) for (_, a, b), (_, c, d) in zip(top1, corr)]
    ok = None if not quads or any(None in q for q in quads) else \
        all(greater(a, b) and greater(d, c) for a, b, c, d in quads)
    return claim("Fig. 5", "A frozen pre-trained text encoder helps CLIP.",
                 "At every data scale measured, CLIP with the frozen pre-trained text tower has a higher top-1 and a "
                 "lower Spearman(prediction count, frequency) than CLIP from scratch (a > b both; Fig. 5b).",
                 ["fraction", "top1 frozen", "top1 scratch", "corr_pred frozen", "corr_pred scratch"], rows,
                 verdict_of(ok))


def claim_finetune_overfits(runs):
    pairs = compare_modes(runs, "frozen", "finetune")
    rows = [[f"{f:g}", fmt(a), fmt(b)] for f, a, b in pairs]
    ok = None if not pairs or any(None in (a, b) for _, a, b in pairs) else all(greater(a, b) for _, a, b in pairs)
    return claim("Fig. 5", "Fine-tuning the pre-trained text encoder over-fits (worse than keeping it frozen).",
                 "At every data scale measured, the fine-tuned text tower gives a lower top-1 than the frozen one.",
                 ["fraction", "top1 frozen", "top1 fine-tuned"], rows, verdict_of(ok))


def tail_stats(runs, shots):
    """{method key: top1_tail Stat} for one tail; keys clip-frozen, sl, sl-frozen, sl-frozen-voc."""
    return {pattern.split("_")[0]: stat(runs, pattern.format(shots=shots), "top1_tail") for _, pattern in TAIL_METHODS}


TAIL_KEYS = ["clip-frozen", "sl", "sl-frozen", "sl-frozen-voc"]


TAIL_HEADER = ["tail (top1_tail)", "CLIP frozen text", "SL", "SL + frozen", "SL + frozen + voc", "premise: CLIP > SL"]


TAIL_PREMISE = ("Premise, in both the one-shot and the zero-shot tail: CLIP's (frozen text tower) tail top-1 > SL's "
                "(else 'premise not met'; the last column says which tail). ")


def tail_premise(t):
    """CLIP (frozen text tower) reaches the tail beyond SL in one tail: True / False / None (a run missing)."""
    return None if None in (t["clip-frozen"], t["sl"]) else greater(t["clip-frozen"], t["sl"])


def tail_row(shots, t, met):
    return [f"{shots}-shot"] + [fmt(t[k]) for k in TAIL_KEYS] + [{None: MISSING, True: "met", False: "not met"}[met]]


def tail_premise_of(premises):
    """False when the premise fails in a tail, None when a tail cannot tell, else True."""
    return False if False in premises else None if None in premises else True


def decide_in_both_tails(runs, needed, rule):
    """(rows, verdict) of a Fig. 8/9 rule: rule(t) must hold in the one- and the zero-shot tail (t: the Stats
    of TAIL_KEYS, the runs `needed` present), and the premise (tail_premise) in both."""
    rows, checks, premises = [], [], []
    for shots in (1, 0):
        t = tail_stats(runs, shots)
        premises.append(tail_premise(t))
        rows.append(tail_row(shots, t, premises[-1]))
        if None not in (t[k] for k in needed):
            checks.append(rule(t))
    ok = all(checks) if len(checks) == 2 else None
    return rows, verdict_of(ok, tail_premise_of(premises))


def claim_frozen_prototypes_barely_help(runs):
    rows, verdict = decide_in_both_tails(
        runs, ("clip-frozen", "sl", "sl-frozen"),
        lambda t: t["sl-frozen"].mean - t["sl"].mean < 0.5 * (t["clip-frozen"].mean - t["sl"].mean))
    return claim("Fig. 8/9", "With tail classes trimmed to one or zero shots, SL with frozen CLIP prototypes alone "
                 "barely helps the tail.",
                 TAIL_PREMISE + "Rule: in both tails, SL + frozen prototypes closes less than half of the "
                 "tail-accuracy gap between SL and CLIP (frozen text tower).", TAIL_HEADER, rows, verdict)


def claim_voc_clip_like_tail(runs):
    rows, verdict = decide_in_both_tails(
        runs, ("clip-frozen", "sl-frozen", "sl-frozen-voc"),
        lambda t: (greater(t["sl-frozen-voc"], t["sl-frozen"])
                   and t["sl-frozen-voc"].mean >= 0.8 * t["clip-frozen"].mean))
    return claim("Fig. 8/9", "Adding vocabulary subsampling to SL with frozen prototypes gives CLIP-like tail "
                 "accuracy.",
                 TAIL_PREMISE + "Rule: in both tails, SL + frozen prototypes + vocabulary subsampling has a higher "
                 "tail top-1 than SL + frozen prototypes and at least 80% of CLIP's (frozen text tower).",
                 TAIL_HEADER, rows, verdict)


def prototype_affinity(run):
    """{'tail': .., 'other': ..}: mean cosine between the prototypes of two distinct tail classes, and of two
    distinct other classes, in a run's affinity.npz (sl_tail.py's class sample), or None without the file."""
    path = os.path.join(run["dir"], "affinity.npz")
    if not os.path.isfile(path):
        return None
    with np.load(path) as z:
        affinity, is_tail = np.asarray(z["affinity"], dtype=np.float64), z["is_tail"].astype(bool)
    means = {}
    for name, members in (("tail", is_tail), ("other", ~is_tail)):
        block = affinity[np.ix_(members, members)]
        k = len(block)
        means[name] = (block.sum() - np.trace(block)) / (k * (k - 1)) if k > 1 else None
    return means


def affinity_stat(runs, experiment, which):
    """Stat over seeds of prototype_affinity(run)[which], or None when no run has it."""
    values = [a[which] for a in (prototype_affinity(r) for r in runs.get(experiment, []))
              if a is not None and a[which] is not None]
    return Stat(values) if values else None


def claim_tail_prototypes_collapse(runs):
    learned = {w: affinity_stat(runs, "sl_tail0", w) for w in ("tail", "other")}
    frozen = {w: affinity_stat(runs, "sl-frozen_tail0", w) for w in ("tail", "other")}
    rows = [["SL, learned head", "`sl_tail0`", fmt(learned["tail"]), fmt(learned["other"])],
            ["SL, frozen prototypes", "`sl-frozen_tail0`", fmt(frozen["tail"]), fmt(frozen["other"])]]
    needed = (learned["tail"], learned["other"], frozen["tail"])
    ok = None if None in needed else \
        greater(learned["tail"], frozen["tail"]) and greater(learned["tail"], learned["other"])
    return claim("Fig. 9a", "Without training images, the tail classes' learned prototypes collapse onto each "
                 "other; frozen prototypes keep them apart.",
                 "In the zero-shot tail, the mean cosine between the prototypes of two distinct tail classes is "
                 "higher for SL's learned head than for the frozen prototypes, and higher than between two distinct "
                 "non-tail classes of the learned head (a > b both; sl_tail.py's affinity.npz class sample).",
                 ["head", "experiment", "mean cosine, tail pairs", "mean cosine, other pairs"], rows,
                 verdict_of(ok))


def claim_dino_subsampling_narrows_gap(runs):
    key = "probe_mean_score"
    bal, van = stat(runs, "dino_balanced", key), stat(runs, "dino_vanilla", key)
    subs = {exp: stat(runs, exp, key) for exp in numbered("dino_voc", runs).values()}
    rows = [["balanced, vanilla", "`dino_balanced`", fmt(bal), _gap(bal, bal), ""],
            ["imbalanced, vanilla", "`dino_vanilla`", fmt(van), _gap(bal, van), ""]]
    rows += [["imbalanced, subsampled", f"`{exp}`", fmt(s), _gap(bal, s), _closed(bal, van, s)]
             for exp, s in subs.items()]
    if not subs:
        rows.append(["imbalanced, subsampled", "`dino_voc<V>`", MISSING, MISSING, MISSING])
    premise = None if None in (bal, van) else greater(bal, van)
    ok = None if van is None or bal is None or not subs or None in subs.values() else \
        all(greater(s, van) and s.mean - van.mean >= 0.5 * (bal.mean - van.mean) for s in subs.values())
    return claim("Fig. 10 / Tab. 2", "Prototype subsampling narrows DINO's transfer gap between imbalanced "
                 "(LAIONet) and balanced (ImageNet) pre-training.",
                 "Premise: balanced pre-training has a higher mean linear-probe score than vanilla DINO on the "
                 "imbalanced data (a > b; else 'premise not met'). Rule: every subsampled run (all V) has a higher "
                 "mean linear-probe score than vanilla (a > b) and closes at least half of the vanilla-to-balanced "
                 "gap (Table 2: V = 16,384 closes ~80%).",
                 ["pre-train", "experiment", "probe mean", "gap to balanced", "share of the gap closed"], rows,
                 verdict_of(ok, premise))


def _gap(reference, s):
    return MISSING if reference is None or s is None else f"{reference.mean - s.mean:.3f}"


def _closed(bal, van, s):
    """(s - vanilla) / (balanced - vanilla) as a percentage ('n/a' without a gap to close)."""
    if None in (bal, van, s):
        return MISSING
    return f"{100 * (s.mean - van.mean) / (bal.mean - van.mean):.0f}%" if bal.mean != van.mean else "n/a (no gap)"


def claim_dino_small_head_worse(runs):
    key = "probe_mean_score"
    small = stat(runs, "dino_small-head", key)
    k = lookup(runs["dino_small-head"][0]["final"], "prototypes") if "dino_small-head" in runs else None
    match = numbered("dino_voc", runs).get(float(k)) if k else None
    sub = stat(runs, match, key) if match else None
    rows = [[f"plain head of {k or 'K_small'} prototypes", "`dino_small-head`", fmt(small)],
            [f"subsampling {k or 'K_small'} of K prototypes", f"`{match or 'dino_voc<K_small>'}`", fmt(sub)]]
    ok = None if small is None or sub is None else greater(sub, small)
    return claim("Fig. 10 / Tab. 2", "A plain smaller head is worse than subsampling the same number of prototypes "
                 "from a large head.",
                 "The subsampled run whose V equals the small head's K has a higher mean linear-probe score than the "
                 "small head.", ["run", "experiment", "probe mean"], rows, verdict_of(ok))


CLAIMS = [claim_sl_more_biased, claim_voc_close_to_template_clip, claim_smaller_voc_debias,
          claim_intermediate_voc_accuracy, claim_descriptive_captions, claim_more_data, claim_frozen_text_helps,
          claim_finetune_overfits, claim_frozen_prototypes_barely_help, claim_voc_clip_like_tail,
          claim_dino_subsampling_narrows_gap, claim_dino_small_head_worse, claim_tail_prototypes_collapse]


# How the rules above read the paper more faithfully than their first versions (REPORT.md, "Rule changes"):
# (claims, what changed, why)
RULE_CHANGES = [
    ("3", "also needs SL with all classes above the smallest vocabulary beyond the seed spread",
     "a Spearman over means alone could pass on differences smaller than the seed spread"),
    ("5", "compares the ends of the order (title vs title+description+tags) instead of every step",
     "the paper says \"roughly monotonic\", and demanding every step asked more than it says"),
    ("7", "also needs a lower correlation than from scratch at every data scale",
     "Fig. 5b shows the frozen text encoder lowering the correlation too"),
    ("9, 10", "premise: CLIP's tail top-1 above SL's in both tails, else 'premise not met'",
     "comparing SL to CLIP's tail accuracy only means something when CLIP reaches the tail"),
    ("11", "premise: balanced above vanilla, and then every subsampled run must beat vanilla and close half the gap",
     "\"narrows the gap\" needs the gap (balanced > vanilla) and Table 2's subsampled runs close most of it, "
     "at every V"),
]


# ---- The Sanity table's rows ------------------------------------------------------------------------------

def fmt_sanity(s):
    """mean ± std over seeds, the minimum over seeds in brackets when there are several, or 'missing'."""
    if s is None:
        return MISSING
    return f"{s.mean:.3f}" + (f" ± {s.std:.3f} [min {min(s.values):.3f}] ({s.n} seeds)" if s.n > 1 else "")


def sanity_verdict(s, passes):
    return MISSING if s is None else "pass" if passes else "fail"


def dino_pretraining_runs(runs):
    """The DINO pre-training experiments: Table 2's rows and any other dino_* present, not the random backbone."""
    names = [exp for _, exp in dino_runs(runs)]
    names += sorted(exp for exp in runs if exp.startswith("dino_") and exp not in names)
    return [exp for exp in names if exp != DINO_RANDOM]


def sanity_rows(runs):
    """[check, experiment(s), value, floor, verdict] of the Sanity table (SANITY_FLOORS, DINO_*)."""
    rows = []
    for check, exp, key, floor in SANITY_FLOORS:
        s = stat(runs, exp, key)
        rows.append([check, f"`{exp}`", fmt_sanity(s), f"{key} ≥ {floor:.2f}",
                     sanity_verdict(s, s is not None and s.mean >= floor)])
    for exp in dino_pretraining_runs(runs):
        # the loss is a cross-entropy over the prototypes an iteration uses: K, or V of them with --voc V
        loss, k, v = stat(runs, exp, "final_loss"), stat(runs, exp, "prototypes"), stat(runs, exp, "voc")
        if k is not None and v is not None and 0 < v.mean < k.mean:
            k = v
        if k is None or k.mean < 1:
            loss, floor, floor_text = None, None, f"final_loss ≤ {DINO_LOSS_FLOOR:g} ln K (K {MISSING})"
        else:
            floor = DINO_LOSS_FLOOR * math.log(k.mean)
            floor_text = f"final_loss ≤ {DINO_LOSS_FLOOR:g} ln K = {DINO_LOSS_FLOOR:g} ln {k.mean:.0f} = {floor:.3f}"
        rows.append(["DINO learns", f"`{exp}`", fmt_sanity(loss), floor_text,
                     sanity_verdict(loss, loss is not None and loss.mean <= floor)])
    rand = stat(runs, DINO_RANDOM, "probe_mean_score")
    for exp in dino_pretraining_runs(runs):
        s = stat(runs, exp, "probe_mean_score")
        diff = None if None in (s, rand) else s.mean - rand.mean
        value = MISSING if diff is None else f"{fmt_sanity(s)} − {fmt_sanity(rand)} = {diff:+.3f}"
        rows.append(["DINO beats a random backbone", f"`{exp}` − `{DINO_RANDOM}`", value,
                     f"probe_mean_score difference ≥ +{DINO_RANDOM_MARGIN:.2f}",
                     sanity_verdict(diff, diff is not None and diff >= DINO_RANDOM_MARGIN - 1e-9)])
    return rows


def verdict_summary(claims):
    """'N of 12 supported; ...': 'premise not met' counts as not supported (and is said apart)."""
    n = {v: sum(c["verdict"] == v for c in claims) for v in VERDICTS}
    unsupported = n["not supported"] + n["premise not met"]
    return (f"{n['supported']} of {len(claims)} supported, {unsupported} not supported"
            + (f" ({n['premise not met']} of them: premise not met)" if n["premise not met"] else "")
            + f", {n['missing runs']} missing runs.")
