"""metrics.py against independent computations: plain per-class numpy loops written here, numpy's
pinv / corrcoef, scipy, and hand-made cases of known value (issue 5)."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- independent reference implementations

def loop_per_class_accuracy(preds, labels, num_classes):
    out = []
    for c in range(num_classes):
        in_class = [p == y for p, y in zip(preds, labels) if y == c]
        out.append(sum(in_class) / len(in_class) if in_class else np.nan)
    return np.array(out)


def loop_nc(features, labels, num_classes, classifier=None, rcond=1e-10):
    """Neural-collapse metrics straight from the definitions (Eq. 1), one class at a time, with
    numpy's SVD-based pinv. Classes without samples are dropped."""
    h = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    present = [c for c in range(num_classes) if np.any(labels == c)]
    k = len(present)
    n, d = h.shape
    mu_g = h.mean(axis=0)
    means = {c: h[labels == c].mean(axis=0) for c in present}
    sigma_w = np.zeros((d, d))
    sigma_w_c = {}
    for c in present:
        x = h[labels == c] - means[c]
        scatter = sum(np.outer(row, row) for row in x)
        sigma_w += scatter / n
        sigma_w_c[c] = scatter / len(x)
    sigma_b = sum(np.outer(means[c] - mu_g, means[c] - mu_g) for c in present) / k
    pinv = np.linalg.pinv(sigma_b, rcond=rcond)
    out = {"nc1": np.trace(sigma_w @ pinv) / k,
           "per_class": {"nc1": {c: np.trace(sigma_w_c[c] @ pinv) for c in present}}}

    def etf_gap(vectors):  # dict class -> vector
        def cos(a, b):
            return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        per_mean, per_nn = {}, {}
        for c in present:
            others = [o for o in present if o != c]
            gaps = [abs(cos(vectors[c], vectors[o]) + 1 / (k - 1)) for o in others]
            nearest = max(others, key=lambda o: cos(vectors[c], vectors[o]))
            per_mean[c] = sum(gaps) / (k - 1)
            per_nn[c] = abs(cos(vectors[c], vectors[nearest]) + 1 / (k - 1))
        return per_mean, per_nn

    per_mean, per_nn = etf_gap({c: means[c] - mu_g for c in present})
    out.update(nc2_m=np.mean(list(per_mean.values())), nc2_m_nn=np.mean(list(per_nn.values())))
    out["per_class"].update(nc2_m=per_mean, nc2_m_nn=per_nn)
    if classifier is not None:
        per_mean, per_nn = etf_gap({c: np.asarray(classifier, dtype=np.float64)[c] for c in present})
        out.update(nc2_w=np.mean(list(per_mean.values())), nc2_w_nn=np.mean(list(per_nn.values())))
        out["per_class"].update(nc2_w=per_mean, nc2_w_nn=per_nn)
    return out


def assert_nc_matches(got, ref, num_classes, rtol=1e-8, atol=1e-10):
    keys = [k for k in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn") if k in ref]
    for key in keys:
        assert got[key] == pytest.approx(ref[key], rel=rtol, abs=atol), key
        expected = np.full(num_classes, np.nan)
        for c, v in ref["per_class"][key].items():
            expected[c] = v
        np.testing.assert_allclose(got["per_class"][key], expected, rtol=rtol, atol=atol, err_msg=key)


def long_tailed_problem(num_classes=6, dim=8, n=240, seed=0, spread=3.0):
    """Imbalanced random features with class structure, and a random classifier."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_classes + 1)
    labels = rng.choice(num_classes, size=n, p=weights / weights.sum())
    labels[:num_classes] = np.arange(num_classes)  # every class present
    centres = rng.normal(size=(num_classes, dim)) * spread
    features = centres[labels] + rng.normal(size=(n, dim))
    classifier = rng.normal(size=(num_classes, dim))
    return features, labels, classifier


def simplex_etf(num_classes, dim):
    """num_classes unit vectors in dim >= num_classes dims with pairwise cosine -1/(C-1)."""
    m = np.eye(num_classes) - np.ones((num_classes, num_classes)) / num_classes
    m *= math.sqrt(num_classes / (num_classes - 1))
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(dim, dim)))
    return m @ rotation[:num_classes]


# ---------------------------------------------------------------- per-class statistics

def test_per_class_accuracy_matches_loop_and_is_nan_for_empty_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=300)
    labels[labels == 3] = 4  # class 3 has no samples
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 7, size=300))
    got = metrics.per_class_accuracy(torch.from_numpy(preds), labels, 7)
    np.testing.assert_allclose(got, loop_per_class_accuracy(preds, labels, 7))
    assert np.isnan(got[3])


def test_prediction_counts_and_confusion_matrix_match_loops():
    rng = np.random.default_rng(1)
    labels, preds = rng.integers(0, 5, size=200), rng.integers(0, 5, size=200)
    confusion = np.zeros((5, 5), dtype=int)
    for p, y in zip(preds, labels):
        confusion[y, p] += 1
    np.testing.assert_array_equal(metrics.confusion_matrix(preds, labels, 5), confusion)
    np.testing.assert_array_equal(metrics.prediction_counts(preds, 5), [np.sum(preds == c) for c in range(5)])


def test_head_tail_accuracy_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    preds = np.array([0, 1, 1, 1, 0, 2, 3])
    got = metrics.head_tail_accuracy(preds, labels, tail_classes=[2, 3])
    assert got == {"top1_tail": pytest.approx(2 / 3), "top1_other": pytest.approx(3 / 4)}
    assert metrics.head_tail_accuracy(preds, labels, np.array([False, False, True, True])) == got


def test_bad_class_ids_are_rejected():
    with pytest.raises(ValueError, match="labels must lie in"):
        metrics.per_class_accuracy([0, 1], [0, 5], 3)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.per_class_accuracy([0, 1], [0], 3)
    with pytest.raises(ValueError, match="integer"):
        metrics.prediction_counts(np.array([0.5, 1.0]), 3)


# ---------------------------------------------------------------- correlations

def test_spearman_hand_made_value_with_ties():
    # ranks of y: 1, 2, 3.5, 5, 3.5 -> rho = 8 / sqrt(10 * 9.5)
    assert metrics.correlation([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-15)
    assert metrics.correlation([1, 10, 100], [0.1, 0.2, 0.9]) == pytest.approx(1.0)
    assert metrics.correlation([1, 10, 100], [3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_equals_scipy_exactly_and_leaves_out_nan():
    rng = np.random.default_rng(2)
    freq = rng.integers(0, 50, size=100).astype(float)  # ties included
    stat = rng.integers(0, 10, size=100) / 10
    stat[[3, 17, 40]] = np.nan
    keep = ~np.isnan(stat)
    assert metrics.correlation(freq, stat) == scipy.stats.spearmanr(freq[keep], stat[keep]).statistic
    assert metrics.correlation(freq, stat, log=True) == scipy.stats.spearmanr(freq[keep], stat[keep]).statistic


def test_pearson_raw_and_log_match_numpy_corrcoef():
    rng = np.random.default_rng(3)
    freq = rng.pareto(1.5, size=80) * 100
    freq[0] = 0  # zero-shot class: log(1 + 0) = 0 stays in
    stat = rng.random(80)
    assert metrics.correlation(freq, stat, "pearson") == pytest.approx(np.corrcoef(freq, stat)[0, 1], abs=1e-12)
    assert metrics.correlation(freq, stat, "pearson", log=True) == pytest.approx(
        np.corrcoef(np.log1p(freq), stat)[0, 1], abs=1e-12)


def test_correlation_degenerate_cases_are_nan():
    assert math.isnan(metrics.correlation([1, 2, 3], [np.nan, np.nan, 1.0]))
    assert math.isnan(metrics.correlation([1, 2, 3], [0.5, 0.5, 0.5]))  # constant accuracy
    with pytest.raises(ValueError, match="method"):
        metrics.correlation([1, 2], [1, 2], method="kendall")


def test_always_predicting_the_most_frequent_class():
    rng = np.random.default_rng(4)
    train_counts = rng.permutation(np.arange(1, 21) * 7)
    labels = np.repeat(np.arange(20), 5)  # balanced test set
    preds = np.full_like(labels, int(np.argmax(train_counts)))
    final, per_class = metrics.summarize(preds, labels, train_counts)
    counts = np.zeros(20)
    counts[np.argmax(train_counts)] = 100
    assert final["corr_pred"] == scipy.stats.spearmanr(train_counts, counts).statistic
    assert final["corr_pred"] > 0
    assert final["top1"] == pytest.approx(0.05)
    assert [row["pred_count"] for row in per_class] == counts.astype(int).tolist()


def test_binned_stats_equal_count_bins_and_edges():
    freq = np.array([5, 1, 3, 100, 50, 2, 8, np.nan])
    stat = np.array([0.5, 0.1, 0.3, 1.0, 0.9, 0.2, 0.6, 0.7])
    bins = metrics.binned_stats(freq, stat, bins=3)  # sorted: 1 2 3 | 5 8 | 50 100
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [(1, 3, 3), (5, 8, 2), (50, 100, 2)]
    assert bins[0]["mean"] == pytest.approx(0.2) and bins[0]["std"] == pytest.approx(np.std([0.1, 0.2, 0.3]))
    bins = metrics.binned_stats(freq, stat, bins=[0, 4, 10, 100])
    assert [b["count"] for b in bins] == [3, 2, 2]  # 100 falls in the closed last bin
    assert bins[2]["mean"] == pytest.approx(0.95)


def test_freq_tables_read_and_match_by_name(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("tench\t10\ngoldfish\t3\ngreat white shark\t7\nonly in a\t1\n")
    b.write_text("great white shark\t70\ntench\t100\n\ngoldfish\t30\n")  # other order, a blank line
    table_a, table_b = metrics.read_freq_table(str(a)), metrics.read_freq_table(str(b))
    assert table_a == {"tench": 10, "goldfish": 3, "great white shark": 7, "only in a": 1}
    r = metrics.freq_table_correlation(table_a, table_b)
    assert (r["value"], r["matched"], r["only_a"], r["only_b"]) == (pytest.approx(1.0), 3, ["only in a"], [])


@pytest.mark.parametrize("content, line", [("tench\t10\ngoldfish 3\n", 2), ("a\t1\nb\t-2\n", 2),
                                           ("a\tmany\n", 1), ("a\t1\nb\t2\na\t3\n", 3)])
def test_malformed_freq_table_names_file_and_line(tmp_path, content, line):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"bad.txt:{line}:"):
        metrics.read_freq_table(str(path))


def test_missing_freq_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        metrics.read_freq_table(str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------- neural collapse

def test_nc_metrics_match_per_class_loop_on_random_data():
    features, labels, classifier = long_tailed_problem()
    got = metrics.nc_metrics(features, labels, 6, classifier)
    assert_nc_matches(got, loop_nc(features, labels, 6, classifier), 6)


def test_nc_metrics_accept_torch_float32_and_numpy_alike():
    features, labels, classifier = long_tailed_problem(seed=5)
    features = features.astype(np.float32)
    from_numpy = metrics.nc_metrics(features, labels, 6, classifier)
    from_torch = metrics.nc_metrics(torch.from_numpy(features).requires_grad_(), torch.from_numpy(labels), 6,
                                    torch.from_numpy(classifier).float())
    for key in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn"):
        assert from_torch[key] == pytest.approx(from_numpy[key], rel=1e-6)
        assert isinstance(from_torch[key], float)
    assert isinstance(from_torch["per_class"]["nc1"], np.ndarray)


def test_perfectly_collapsed_features_have_nc1_zero():
    means = np.random.default_rng(6).normal(size=(4, 10))
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    got = metrics.nc_metrics(means[labels], labels, 4)
    assert got["nc1"] == pytest.approx(0, abs=1e-12)
    np.testing.assert_allclose(got["per_class"]["nc1"], 0, atol=1e-12)
    assert math.isnan(got["nc2_w"])  # no classifier given
    assert metrics.nc_metrics(means[labels] + 0.1 * np.random.default_rng(7).normal(size=(10, 10)),
                              labels, 4)["nc1"] > 1e-3


@pytest.mark.parametrize("num_classes, dim", [(5, 5), (4, 12), (2, 3)])
def test_simplex_etf_means_and_classifier_have_nc2_zero(num_classes, dim):
    etf = simplex_etf(num_classes, dim) * 3 + 5.0  # offset: NC2_M centres by the global mean
    offsets = np.random.default_rng(8).normal(size=(4, dim))
    # each class: 4 samples mean + (o, -o) pairs, so class means are exact and classes balanced
    features = np.concatenate([etf[c] + np.concatenate([offsets[:2], -offsets[:2]]) for c in range(num_classes)])
    labels = np.repeat(np.arange(num_classes), 4)
    got = metrics.nc_metrics(features, labels, num_classes, classifier=etf - 5.0)
    for key in ("nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn"):
        assert got[key] == pytest.approx(0, abs=1e-12), key
        np.testing.assert_allclose(got["per_class"][key], 0, atol=1e-12)
    not_etf = metrics.nc_metrics(features, labels, num_classes, classifier=etf)  # uncentred: not an ETF
    assert num_classes == 2 or not_etf["nc2_w"] > 0.1


def test_class_with_one_sample_has_zero_within_class_scatter():
    features, labels, classifier = long_tailed_problem(seed=9)
    labels[labels == 5] = 4
    labels[-1] = 5  # class 5: exactly one sample
    got = metrics.nc_metrics(features, labels, 6, classifier)
    assert got["per_class"]["nc1"][5] == 0.0
    assert_nc_matches(got, loop_nc(features, labels, 6, classifier), 6)


def test_class_with_no_samples_is_left_out():
    features, labels, classifier = long_tailed_problem(seed=10)
    labels[labels == 2] = 3  # class 2: no samples
    got = metrics.nc_metrics(features, labels, 6, classifier)
    for key in got["per_class"]:
        assert np.isnan(got["per_class"][key][2])
    assert_nc_matches(got, loop_nc(features, labels, 6, classifier), 6)
    # same numbers as the problem without class 2 at all
    compact = np.searchsorted([0, 1, 3, 4, 5], labels)
    without = metrics.nc_metrics(features, compact, 5, classifier[[0, 1, 3, 4, 5]])
    for key in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn"):
        assert without[key] == pytest.approx(got[key], rel=1e-10)


def test_two_classes():
    features, labels, classifier = long_tailed_problem(num_classes=2, dim=5, n=50, seed=11)
    got = metrics.nc_metrics(features, labels, 2, classifier)
    assert_nc_matches(got, loop_nc(features, labels, 2, classifier), 2)
    # two centred means are always antiparallel: cos = -1 = -1/(C-1)
    assert got["nc2_m"] == pytest.approx(0, abs=1e-12)


def test_more_dimensions_than_samples():
    features, labels, classifier = long_tailed_problem(num_classes=3, dim=40, n=12, seed=12)
    got = metrics.nc_metrics(features, labels, 3, classifier)
    assert_nc_matches(got, loop_nc(features, labels, 3, classifier), 3)


def test_nc_chunking_gives_the_same_numbers(monkeypatch):
    features, labels, classifier = long_tailed_problem(seed=13)
    whole = metrics.nc_metrics(features, labels, 6, classifier)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 3 * features.shape[1])  # 3 rows per chunk
    chunked = metrics.nc_metrics(features, labels, 6, classifier)
    for key in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-10)
        np.testing.assert_allclose(chunked["per_class"][key], whole["per_class"][key], rtol=1e-10)


def test_nc_degenerate_and_bad_input():
    features = np.random.default_rng(14).normal(size=(6, 3))
    assert math.isnan(metrics.nc_metrics(features, np.zeros(6, dtype=int), 4)["nc1"])  # one class only
    features[2, 1] = np.nan
    with pytest.raises(ValueError, match="nan or inf"):
        metrics.nc_metrics(features, np.array([0, 1, 0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="one row per class"):
        metrics.nc_metrics(None, np.array([0, 1]), 2, classifier=np.ones((3, 4)))


@pytest.mark.cuda
def test_nc_metrics_on_gpu_match_cpu():
    features, labels, classifier = long_tailed_problem(seed=15)
    cpu = metrics.nc_metrics(features, labels, 6, classifier)
    gpu = metrics.nc_metrics(torch.from_numpy(features).cuda(), torch.from_numpy(labels).cuda(), 6,
                             torch.from_numpy(classifier).cuda())
    for key in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-9)


def test_affinity_matrix_is_prototype_cosine():
    protos = np.random.default_rng(16).normal(size=(5, 7))
    full = metrics.affinity_matrix(protos)
    for i in range(5):
        for j in range(5):
            expected = protos[i] @ protos[j] / (np.linalg.norm(protos[i]) * np.linalg.norm(protos[j]))
            assert full[i, j] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(metrics.affinity_matrix(torch.from_numpy(protos), [3, 0]), full[np.ix_([3, 0], [3, 0])])


# ---------------------------------------------------------------- summary and run outputs

def test_summarize_combines_the_metrics():
    features, labels, classifier = long_tailed_problem(seed=17)
    rng = np.random.default_rng(17)
    preds = np.where(rng.random(labels.size) < 0.7, labels, rng.integers(0, 6, size=labels.size))
    train_counts = np.array([500, 200, 90, 40, 9, 1])
    final, per_class = metrics.summarize(preds, labels, train_counts, features, classifier, tail_classes=[4, 5])
    accuracy = loop_per_class_accuracy(preds, labels, 6)
    pred_count = np.bincount(preds, minlength=6)
    assert final["top1"] == pytest.approx(np.mean(preds == labels))
    assert final["corr_acc"] == scipy.stats.spearmanr(train_counts, accuracy).statistic
    assert final["corr_pred"] == scipy.stats.spearmanr(train_counts, pred_count).statistic
    assert final["corr_acc_pearson"] == pytest.approx(np.corrcoef(train_counts, accuracy)[0, 1])
    assert final["corr_pred_pearson_log"] == pytest.approx(np.corrcoef(np.log1p(train_counts), pred_count)[0, 1])
    assert final["nc1"] == pytest.approx(loop_nc(features, labels, 6)["nc1"])
    assert final["top1_tail"] == pytest.approx(np.mean((preds == labels)[labels >= 4]))
    assert (final["num_classes"], final["num_eval"]) == (6, labels.size)
    assert [row["accuracy"] for row in per_class] == pytest.approx(accuracy.tolist())
    without, _ = metrics.summarize(preds, labels, train_counts)
    assert all(math.isnan(without[k]) for k in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn"))
    assert "top1_tail" not in without
    with pytest.raises(ValueError, match="tail_classes"):
        metrics.summarize(preds, labels, train_counts, tail_classes=[6])


def test_summarize_leaves_out_classes_without_eval_samples():
    labels = np.array([0, 0, 1, 1, 3, 3])  # class 2 is never evaluated but predicted once
    preds = np.array([0, 2, 1, 1, 3, 0])
    train_counts = np.array([40, 30, 20, 10])
    final, per_class = metrics.summarize(preds, labels, train_counts)
    kept = [0, 1, 3]
    assert final["corr_acc"] == scipy.stats.spearmanr(train_counts[kept], [0.5, 1.0, 0.5]).statistic
    assert final["corr_pred"] == scipy.stats.spearmanr(train_counts[kept], [2, 2, 1]).statistic
    assert math.isnan(per_class[2]["accuracy"]) and per_class[2]["pred_count"] == 1


def _write_example_run(out_dir, with_features=True):
    features, labels, classifier = long_tailed_problem(seed=18)
    rng = np.random.default_rng(18)
    preds = np.where(rng.random(labels.size) < 0.6, labels, rng.integers(0, 6, size=labels.size))
    final = metrics.write_eval_outputs(
        str(out_dir), preds, labels, np.array([300, 100, 50, 20, 5, 1]), [f"class {c}" for c in range(6)],
        features=torch.from_numpy(features).float() if with_features else None,
        classifier=classifier if with_features else None, tail_classes=[5],
        extra={"method": "test", "out": out_dir, "lr": np.float32(0.5)})  # out: a pathlib.Path
    return final, preds, labels


def test_write_eval_outputs(tmp_path):
    final, preds, labels = _write_example_run(tmp_path / "run")
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["eval.npz", "final.json", "per_class.csv"]  # no temporary left over
    with np.load(run / "eval.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["preds"], preds)
        assert npz["features"].dtype == np.float32 and npz["classnames"][5] == "class 5"
        np.testing.assert_array_equal(npz["tail_classes"], [5])
    saved = json.loads((run / "final.json").read_text())
    assert saved["method"] == "test" and saved["top1"] == pytest.approx(final["top1"])
    assert saved["out"] == str(run) and saved["lr"] == 0.5
    with open(run / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class_index", "class", "frequency", "accuracy", "pred_count",
                             "nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn"]
    assert rows[2]["class"] == "class 2" and int(rows[2]["pred_count"]) == np.sum(preds == 2)
    with pytest.raises(ValueError, match="override"):
        metrics.write_eval_outputs(str(tmp_path / "x"), preds, labels, np.ones(6), list("abcdef"), extra={"top1": 1})


def test_write_eval_outputs_without_features_writes_null(tmp_path):
    _write_example_run(tmp_path / "run", with_features=False)
    saved = json.loads((tmp_path / "run" / "final.json").read_text())  # strict JSON: no NaN tokens
    assert saved["nc1"] is None and saved["nc2_w"] is None
    with np.load(tmp_path / "run" / "eval.npz", allow_pickle=False) as npz:
        assert "features" not in npz.files


# ---------------------------------------------------------------- command line

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "metrics.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_recomputes_a_run_and_rewrites_with_write(tmp_path):
    final, _, _ = _write_example_run(tmp_path / "run")
    (tmp_path / "run" / "per_class.csv").unlink()
    result = run_cli(str(tmp_path / "run"), "--write")
    assert result.returncode == 0, result.stderr
    assert f"{final['top1']:.4f}" in result.stdout and f"{final['corr_acc']:.4f}" in result.stdout
    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    assert saved["method"] == "test"  # what the training script added survives
    for key in ("nc1", "nc2_m", "nc2_w", "corr_acc", "top1"):  # recomputed from the float32 features
        assert saved[key] == pytest.approx(final[key], rel=1e-6), key  # (the classifier was float64)
    assert (tmp_path / "run" / "per_class.csv").exists()


def test_cli_missing_run_dir_is_a_one_line_error(tmp_path):
    result = run_cli(str(tmp_path / "no_such_run"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no_such_run" in result.stderr


def test_cli_freq_tables(tmp_path, capsys):
    a, b, bad = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "bad.txt"
    a.write_text("".join(f"class {i}\t{i * i}\n" for i in range(30)))
    b.write_text("".join(f"class {i}\t{(i * 7) % 30}\n" for i in range(30)))
    bad.write_text("class 0\t1\nclass 1\n")
    assert metrics.main(["--freq", str(a), "--freq", str(b)]) == 0  # in process: saves a torch start-up
    rho = scipy.stats.spearmanr(np.arange(30) ** 2, (np.arange(30) * 7) % 30).statistic
    out = capsys.readouterr().out
    assert f"{rho:.4f}" in out and "30 shared classes" in out
    result = run_cli("--freq", str(a), "--freq", str(bad))
    assert result.returncode == 2 and "bad.txt:2:" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_cli_argument_errors_in_process(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "eval.npz").write_bytes(b"not a zip file")
    for argv in ([str(tmp_path / "broken")], [str(tmp_path)], [], ["--freq", "only_one.txt"], [str(tmp_path), "--freq", "a", "--freq", "b"],
                 ["--freq", "a", "--freq", str(tmp_path / "missing.txt")]):
        with pytest.raises(SystemExit) as exit_info:
            metrics.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith("metrics.py: error:")


# ---------------------------------------------------------------- edge cases (review of 2026-11-26)

def test_coinciding_class_means_give_nan_not_perfect_collapse():
    """Sigma_B = 0: no separation to measure. NC1 must not come out 0 (= perfect collapse)."""
    h = np.array([[1.0], [-1.0], [1.0], [-1.0]])
    got = metrics.nc_metrics(h, np.array([0, 0, 1, 1]), 2)
    assert math.isnan(got["nc1"]) and math.isnan(got["nc2_m"]) and np.isnan(got["per_class"]["nc1"]).all()
    x = np.random.default_rng(3).normal(size=(20, 5))
    same = metrics.nc_metrics(np.concatenate([x, x]), np.repeat([0, 1], 20), 2)  # the same samples twice
    assert math.isnan(same["nc1"])
    apart = metrics.nc_metrics(np.concatenate([x, x + 1e-3]), np.repeat([0, 1], 20), 2)  # barely apart: finite
    ref = loop_nc(np.concatenate([x, x + 1e-3]), np.repeat([0, 1], 20), 2)
    assert math.isfinite(apart["nc1"]) and apart["nc1"] == pytest.approx(ref["nc1"], rel=1e-6)


def test_classifier_rows_of_classes_without_samples_may_be_nan():
    features, labels, classifier = long_tailed_problem(seed=4)
    keep = labels != 5
    w = classifier.copy()
    w[5] = np.nan
    got = metrics.nc_metrics(features[keep], labels[keep], 6, w)
    ref = metrics.nc_metrics(features[keep], labels[keep], 6, classifier)
    assert got["nc2_w"] == ref["nc2_w"] and math.isfinite(got["nc2_w"])
    w[0] = np.nan
    with pytest.raises(ValueError, match="nan or inf"):
        metrics.nc_metrics(features[keep], labels[keep], 6, w)


def test_equal_count_bins_never_split_a_frequency():
    freq = np.array([1, 1, 1, 1, 2, 5, 5, 9])
    stat = np.arange(8) / 10
    bins = metrics.binned_stats(freq, stat, bins=3)
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [(1, 1, 4), (2, 5, 3), (9, 9, 1)]
    zeros = metrics.binned_stats(np.r_[np.zeros(50), np.arange(1, 51)], np.ones(100), bins=4)  # 50 zero-shot
    assert zeros[0]["hi"] == 0 and zeros[0]["count"] == 50 and sum(b["count"] for b in zeros) == 100
    assert all(a["hi"] < b["lo"] for a, b in zip(zeros, zeros[1:]))


def test_summarize_checks_train_counts_and_tail_mask():
    preds = labels = np.array([0, 1, 2, 1])
    with pytest.raises(ValueError, match="train_counts must be numbers"):
        metrics.summarize(preds, labels, np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="non-negative"):
        metrics.summarize(preds, labels, np.array([3, -1, 2]))
    for mask in (np.array([False, True]), np.array([False, True, False, True])):
        with pytest.raises(ValueError, match="one entry per class"):
            metrics.summarize(preds, labels, np.array([3, 1, 2]), tail_classes=mask)
    final, _ = metrics.summarize(preds, labels, np.array([3, 1, 2]), tail_classes=np.array([False, True, False]))
    assert final["top1_tail"] == 1.0


def test_bfloat16_features_are_accepted(tmp_path):
    features, labels, classifier = long_tailed_problem(seed=9)
    final = metrics.write_eval_outputs(str(tmp_path / "run"), labels, labels, np.arange(6, 0, -1),
                                       [f"c{c}" for c in range(6)], features=torch.from_numpy(features).bfloat16(),
                                       classifier=torch.from_numpy(classifier).bfloat16())
    rounded = torch.from_numpy(features).bfloat16().double().numpy()
    assert final["nc1"] == pytest.approx(loop_nc(rounded, labels, 6)["nc1"], rel=1e-6)
    assert metrics.correlation(torch.arange(6.0).bfloat16(), torch.arange(6.0)) == 1.0


def test_freq_table_with_byte_order_mark_and_non_utf8(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("tench\t3\ngoldfish\t1\n".encode("utf-8-sig"))
    assert metrics.read_freq_table(str(bom)) == {"tench": 3, "goldfish": 1}
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\t3\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8"):
        metrics.read_freq_table(str(latin))


def test_cli_bad_run_files_are_one_line_errors(tmp_path):
    _write_example_run(tmp_path / "run")
    with np.load(tmp_path / "run" / "eval.npz") as npz:
        arrays = dict(npz)
    np.savez(tmp_path / "run" / "eval.npz", **{**arrays, "classnames": arrays["classnames"][:4]})
    result = run_cli(str(tmp_path / "run"), "--write")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "classnames" in result.stderr
    np.savez(tmp_path / "run" / "eval.npz", **arrays)
    (tmp_path / "run" / "final.json").write_text("[1, 2]")
    result = run_cli(str(tmp_path / "run"), "--write")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "JSON object" in result.stderr
    (tmp_path / "run" / "final.json").unlink()
    (tmp_path / "run" / "final.json").mkdir()
    result = run_cli(str(tmp_path / "run"), "--write")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "final.json" in result.stderr


def test_cli_write_drops_tail_metrics_the_recomputation_lacks(tmp_path):
    _write_example_run(tmp_path / "run")
    with np.load(tmp_path / "run" / "eval.npz") as npz:
        arrays = {k: v for k, v in npz.items() if k != "tail_classes"}
    np.savez(tmp_path / "run" / "eval.npz", **arrays)
    assert "top1_tail" in json.loads((tmp_path / "run" / "final.json").read_text())
    assert run_cli(str(tmp_path / "run"), "--write").returncode == 0
    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    assert "top1_tail" not in saved and saved["method"] == "test"
