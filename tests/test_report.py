"""report.py: claim verdicts on hand-made run folders with known numbers, seed aggregation, missing runs,
and every figure / REPORT.md section from fabricated runs (fast; the real pipeline is in test_run_all.py)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 100  # classes of the fabricated runs
TAIL = list(range(90, 100))

# One set of numbers under which every claim of the paper holds (checked claim by claim below).
SUPPORTED = {
    # Fig. 3: CLIP caption kinds and SL vocabulary sizes (corr_pred, top1)
    "clip_template": dict(corr_pred=0.20, top1=0.30),
    "clip_title": dict(corr_pred=0.50, top1=0.30),
    "clip_title-desc": dict(corr_pred=0.40, top1=0.35),
    "clip_title-desc-tags": dict(corr_pred=0.30, top1=0.40),
    "sl_voc0": dict(corr_pred=0.80, top1=0.50),
    "sl_voc10": dict(corr_pred=0.25, top1=0.45),
    "sl_voc20": dict(corr_pred=0.40, top1=0.55),
    "sl_voc50": dict(corr_pred=0.60, top1=0.49),
    # Fig. 4 / 6
    "clip_laionet": dict(corr_pred=0.35, top1=0.33),
    "clip_laionet-freqmatch": dict(corr_pred=0.30, top1=0.34),
    "clip_laionet-diverse": dict(corr_pred=0.25, top1=0.31),
    "clip_ow0": dict(corr_pred=0.30, top1=0.40),
    "clip_ow30": dict(corr_pred=0.28, top1=0.41),
    # Fig. 5: data scale x text encoder
    "clip_scratch_frac0.25": dict(corr_pred=0.60, top1=0.20),
    "clip_scratch_frac0.5": dict(corr_pred=0.50, top1=0.25),
    "clip_scratch_frac1": dict(corr_pred=0.40, top1=0.30),
    "clip_frozen_frac0.25": dict(corr_pred=0.40, top1=0.35),
    "clip_frozen_frac0.5": dict(corr_pred=0.35, top1=0.40),
    "clip_frozen_frac1": dict(corr_pred=0.30, top1=0.45),
    "clip_finetune_frac0.25": dict(corr_pred=0.50, top1=0.25),
    "clip_finetune_frac0.5": dict(corr_pred=0.45, top1=0.30),
    "clip_finetune_frac1": dict(corr_pred=0.40, top1=0.35),
    # Fig. 8/9: tails
    "clip-frozen_tail1": dict(top1_tail=0.50, top1_other=0.40),
    "sl_tail1": dict(top1_tail=0.05, top1_other=0.50),
    "sl-frozen_tail1": dict(top1_tail=0.10, top1_other=0.50),
    "sl-frozen-voc_tail1": dict(top1_tail=0.45, top1_other=0.48),
    "clip-frozen_tail0": dict(top1_tail=0.40, top1_other=0.40),
    "sl_tail0": dict(top1_tail=0.00, top1_other=0.50),
    "sl-frozen_tail0": dict(top1_tail=0.05, top1_other=0.50),
    "sl-frozen-voc_tail0": dict(top1_tail=0.35, top1_other=0.48),
    # Fig. 10: DINO (probe mean)
    "dino_balanced": dict(probe_mean_score=0.60, prototypes=4096),
    "dino_vanilla": dict(probe_mean_score=0.50, prototypes=4096),
    "dino_small-head": dict(probe_mean_score=0.48, prototypes=1024),
    "dino_voc1024": dict(probe_mean_score=0.55, prototypes=4096, voc=1024),
}


def make_run(root, name, values, seed=0, files=True):
    """A run folder <name>_s<seed> like the scripts write: final.json (+ per_class.csv, eval.npz, affinity.npz)."""
    path = os.path.join(root, f"{name}_s{seed}")
    os.makedirs(path, exist_ok=True)
    final = dict(num_classes=C, nc1=1.0, nc2_m=0.5, nc2_m_nn=0.6, nc2_w=0.4, nc2_w_nn=0.3, **values)
    final.setdefault("top1", 0.4)
    final.setdefault("corr_acc", 0.3)
    final.setdefault("corr_pred", 0.3)
    if name.startswith("dino"):
        score = values["probe_mean_score"]
        final["probe"] = {"novel": dict(score=score - 0.02), "seen": dict(score=score + 0.02)}
        final["utilisation"] = dict(argmax_winners=300, distinct_prototypes=900, prototypes=values["prototypes"])
    with open(os.path.join(path, "final.json"), "w") as f:
        json.dump(final, f)
    with open(os.path.join(path, "args.json"), "w") as f:
        json.dump(dict(seed=seed), f)
    if not files:
        return path
    rng = np.random.default_rng(seed)
    freq = np.sort(rng.integers(1, 500, C))[::-1]
    with open(os.path.join(path, "per_class.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_index", "class", "frequency", "accuracy", "pred_count", "nc1", "nc2_m", "nc2_m_nn",
                    "nc2_w", "nc2_w_nn"])
        for c in range(C):
            w.writerow([c, f"class {c}", freq[c], rng.random(), rng.integers(0, 40), rng.random(), 0, 0, 0, 0])
    classifier = rng.normal(size=(C, 8)).astype(np.float32)
    np.savez(os.path.join(path, "eval.npz"), preds=np.zeros(10, np.int64), labels=np.zeros(10, np.int64),
             train_counts=freq, classnames=np.array([f"class {c}" for c in range(C)]), classifier=classifier,
             tail_classes=np.array(TAIL if "tail" in name else [], np.int64))
    if name.startswith("sl"):
        sample = TAIL[:5] + [0, 20, 40, 60, 80]
        np.savez(os.path.join(path, "affinity.npz"), classes=np.array(sample), is_tail=np.isin(sample, TAIL),
                 classnames=np.array([f"class {c}" for c in sample]),
                 affinity=np.corrcoef(rng.normal(size=(len(sample), 8))))
    return path


def fabricate(root, table=SUPPORTED, files=False, skip=()):
    for name, values in table.items():
        if name not in skip:
            make_run(str(root), name, values, files=files)
    return report.load_runs(str(root))


def verdicts(runs):
    return {c.__name__: c(runs)["verdict"] for c in report.CLAIMS}


def test_every_claim_supported_by_the_supported_numbers(tmp_path):
    assert set(verdicts(fabricate(tmp_path)).values()) == {"supported"}


def test_no_runs_gives_missing_runs_everywhere(tmp_path):
    assert set(verdicts(report.load_runs(str(tmp_path))).values()) == {"missing runs"}


# (claim, run to change, new values): each flips exactly that claim to "not supported"
FLIPS = [
    ("claim_sl_more_biased", "clip_title", dict(corr_pred=0.75, top1=0.30)),
    ("claim_voc_close_to_template_clip", "sl_voc10", dict(corr_pred=0.55, top1=0.45)),
    ("claim_smaller_voc_debias", "sl_voc10", dict(corr_pred=0.70, top1=0.45)),
    ("claim_intermediate_voc_accuracy", "sl_voc20", dict(corr_pred=0.40, top1=0.45)),
    ("claim_descriptive_captions", "clip_title-desc", dict(corr_pred=0.40, top1=0.45)),
    ("claim_more_data", "clip_finetune_frac1", dict(corr_pred=0.55, top1=0.35)),
    ("claim_frozen_text_helps", "clip_frozen_frac0.5", dict(corr_pred=0.35, top1=0.20)),
    ("claim_finetune_overfits", "clip_finetune_frac0.25", dict(corr_pred=0.50, top1=0.40)),
    ("claim_frozen_prototypes_barely_help", "sl-frozen_tail0", dict(top1_tail=0.30, top1_other=0.5)),
    ("claim_voc_clip_like_tail", "sl-frozen-voc_tail1", dict(top1_tail=0.30, top1_other=0.5)),
    ("claim_dino_subsampling_narrows_gap", "dino_voc1024", dict(probe_mean_score=0.45, prototypes=4096)),
    ("claim_dino_small_head_worse", "dino_small-head", dict(probe_mean_score=0.58, prototypes=1024)),
]


@pytest.mark.parametrize("claim_name,run,values", FLIPS, ids=[f[0] for f in FLIPS])
def test_each_claim_flips_on_its_own_numbers(tmp_path, claim_name, run, values):
    got = verdicts(fabricate(tmp_path, {**SUPPORTED, run: values}))
    assert got[claim_name] == "not supported"
    others = {k: v for k, v in got.items() if k != claim_name}
    # the changed run may legitimately touch another claim of the same figure; all the rest stay supported
    assert sum(v != "supported" for v in others.values()) <= 1


@pytest.mark.parametrize("claim_name,run", [
    ("claim_sl_more_biased", "sl_voc0"), ("claim_descriptive_captions", "clip_title"),
    ("claim_voc_clip_like_tail", "clip-frozen_tail0"), ("claim_dino_small_head_worse", "dino_small-head"),
    ("claim_dino_subsampling_narrows_gap", "dino_vanilla"), ("claim_frozen_text_helps", "clip_frozen_frac0.25"),
    # a verdict on the runs that happen to be there would judge a different claim
    ("claim_sl_more_biased", "clip_title-desc"), ("claim_more_data", "clip_scratch_frac1"),
    ("claim_more_data", "clip_finetune_frac0.25"), ("claim_finetune_overfits", "clip_finetune_frac0.5"),
    ("claim_frozen_text_helps", "clip_scratch_frac1")])
def test_a_missing_run_is_missing_not_a_verdict(tmp_path, claim_name, run):
    runs = fabricate(tmp_path, skip=(run,))
    if run == "clip_frozen_frac0.25":  # every frozen run gone
        runs = {k: v for k, v in runs.items() if not k.startswith("clip_frozen")}
    assert verdicts(runs)[claim_name] == "missing runs"


def test_smaller_voc_rule_matches_scipy_spearman(tmp_path):
    table = {**SUPPORTED, "sl_voc20": dict(corr_pred=0.70, top1=0.55)}  # V: 10, 20, 50, 100 -> .25 .70 .60 .80
    runs = fabricate(tmp_path, table)
    rho = scipy_stats.spearmanr([10, 20, 50, 100], [0.25, 0.70, 0.60, 0.80]).statistic
    result = report.claim_smaller_voc_debias(runs)
    assert rho == pytest.approx(0.8)
    assert result["rows"][-1][-1] == f"{rho:.3f}" and result["verdict"] == "supported"  # rule: rho >= 0.8


def test_seeds_are_aggregated_mean_and_sample_std(tmp_path):
    for seed, top1 in enumerate([0.30, 0.36, 0.42]):
        make_run(str(tmp_path), "clip_template", dict(top1=top1, corr_pred=0.2), seed=seed, files=False)
    runs = report.load_runs(str(tmp_path))
    s = report.stat(runs, "clip_template", "top1")
    assert s.n == 3 and s.mean == pytest.approx(0.36) and s.std == pytest.approx(np.std([.30, .36, .42], ddof=1))
    assert report.fmt(s) == "0.360 ± 0.060 (3 seeds)"


def test_seed_spread_larger_than_the_gap_is_no_evidence(tmp_path):
    """'a > b' needs the gap of the means to exceed the larger seed std."""
    table = dict(SUPPORTED)
    for seed, top1 in enumerate([0.25, 0.45]):  # frozen at 0.25: mean 0.35 but std 0.14 > gap to scratch (0.15)
        make_run(str(tmp_path), "clip_frozen_frac0.25", dict(top1=top1, corr_pred=0.4), seed=seed, files=False)
    del table["clip_frozen_frac0.25"]
    runs = fabricate(tmp_path, table)
    assert report.claim_frozen_text_helps(runs)["verdict"] == "supported"  # 0.35 - 0.20 = 0.15 > 0.141
    make_run(str(tmp_path), "clip_frozen_frac0.25", dict(top1=0.05, corr_pred=0.4), seed=2, files=False)
    runs = report.load_runs(str(tmp_path))  # mean 0.25, std 0.2: gap 0.05 is not evidence
    assert report.claim_frozen_text_helps(runs)["verdict"] == "not supported"


def test_nan_and_unfinished_runs_are_missing(tmp_path):
    make_run(str(tmp_path), "sl_voc0", dict(top1=None, corr_pred=0.8), files=False)  # nan stored as null
    os.makedirs(tmp_path / "sl_voc10_s0")  # unfinished: no final.json
    runs = report.load_runs(str(tmp_path))
    assert "sl_voc10" not in runs
    assert report.stat(runs, "sl_voc0", "top1") is None and report.fmt(None) == "missing"


def test_report_cli_writes_every_figure_and_section(tmp_path):
    """Fabricated run folders -> `python report.py`: all figures, all sections; absent runs read 'missing'."""
    runs_dir, out = tmp_path / "runs", tmp_path / "report"
    fabricate(runs_dir, files=True, skip=("sl_tail0", "dino_balanced"))
    proc = subprocess.run([sys.executable, "report.py", "--runs", str(runs_dir), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in report.FIGURES:
        assert (out / name).stat().st_size > 1000, name
    text = (out / "REPORT.md").read_text()
    for section in report.SECTIONS:
        assert f"## {section}\n" in text, section
    rows = {line.split("|")[3].strip(): line for line in text.splitlines() if line.startswith("| 0-shot | SL |")}
    assert "missing" in rows["`sl_tail0`"] and "0.000" not in rows["`sl_tail0`"]
    balanced = [line for line in text.splitlines() if "`dino_balanced`" in line]
    assert balanced and all("missing" in line for line in balanced)
    assert "| ImageNet, vanilla | 65536 | 27.0 |" in text  # the paper's Table 2 next to ours
    # the zero-shot-tail claims need sl_tail0; claim 12 still has its runs
    assert "**missing runs**" in text and text.count("**supported**") >= 8
    n = len(SUPPORTED) - 2
    assert f"({n} finished runs of {n} experiments)" in text


def test_linked_runs_are_counted_once(tmp_path):
    """run_all.sh links a run two sections share under the second name: one run, two experiments."""
    runs_dir = tmp_path / "runs"
    make_run(str(runs_dir), "sl_voc0", SUPPORTED["sl_voc0"], files=False)
    os.symlink("sl_voc0_s0", runs_dir / "sl_tail-none_s0")
    make_run(str(runs_dir), "clip_template", SUPPORTED["clip_template"], files=False)
    report.write_report(str(runs_dir), str(tmp_path / "out"))
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "(2 finished runs of 3 experiments; shared ones linked under 1 more name)" in text


def test_report_cli_on_a_missing_folder_fails_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "report.py", "--runs", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr


def test_smaller_voc_rule_uses_the_effective_vocabulary(tmp_path):
    """When a batch holds more classes than V, the run competed over those (voc_effective), not over V."""
    table = dict(SUPPORTED)
    for name, eff in (("sl_voc10", 69.0), ("sl_voc20", 69.0), ("sl_voc50", 71.0), ("sl_voc0", 100.0)):
        table[name] = dict(table[name], voc_effective=eff)
    table["sl_voc50"] = dict(table["sl_voc50"], corr_pred=0.20)  # below V=10 and V=20: not monotone
    runs = fabricate(tmp_path, table)
    result = report.claim_smaller_voc_debias(runs)
    effective, corr = [69.0, 69.0, 71.0, 100.0], [0.25, 0.40, 0.20, 0.80]
    rho = scipy_stats.spearmanr(effective, corr).statistic
    assert result["rows"][-1][-1] == f"{rho:.3f}"
    assert result["verdict"] == ("supported" if rho >= 0.8 else "not supported") == "not supported"
    assert [row[2] for row in result["rows"][:4]] == ["69.0", "69.0", "71.0", "100.0"]
