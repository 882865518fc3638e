"""Every number the paper's figures are made of: per-class statistics, their correlation with class
frequency, neural-collapse metrics, and a command over saved run outputs.

Wen et al., "Generalization Beyond Data Imbalance: A Controlled Study on CLIP for Transferable Insights"
(NeurIPS 2024, arXiv 2405.21070):
  - robustness to imbalance = Spearman's rho between a class's training frequency and its per-class
    accuracy / prediction count on a balanced test set (Sec. 3.1, Fig. 1b; Pearson variants, Appx. A.1);
  - accuracy per frequency bin (Fig. 15); correlation between two frequency tables (Appx. A.3);
  - neural collapse NC1 / NC2 of features and classifiers (Eq. 1, Sec. 3.3);
  - cosine affinity between class prototypes (Fig. 9a);
  - the linear probe of DINO's transfer evaluation (Appx. D.3, Table 2).

Conventions:
  - accuracies are fractions in [0, 1], not percent;
  - inputs may be numpy arrays or torch tensors (CPU or GPU); outputs are Python floats / numpy arrays;
  - a class without evaluation samples has no accuracy and no feature mean: it is nan in per-class
    outputs and is left out of every correlation and of every NC metric (C below then counts only the
    classes that have samples).

Command line:
  python metrics.py runs/<name> [--write]       summary recomputed from runs/<name>/eval.npz
  python metrics.py --freq A.txt --freq B.txt [--method spearman|pearson] [--log]
"""

import argparse
import csv
import json
import math
import os
import sys
import warnings

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F

# Eigenvalues of Sigma_B below PINV_RTOL x its largest are treated as zero by the pseudo-inverse.
# Sigma_B has rank <= C (<= C-1 for balanced classes); float64 rounding leaves ~1e-16 x lambda_max in
# the directions it does not span, far below 1e-10, while a class-mean direction carrying signal
# (singular-value ratio of the centred class means above 1e-5) stays far above it.
PINV_RTOL = 1e-10

# Rows of features processed at once: keeps the float64 temporaries at ~32 MB whatever N is.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------

def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16
    return np.asarray(x)


def _class_ids(x, num_classes, name):
    """1-D int64 numpy array of class indices in [0, num_classes)."""
    ids = _to_numpy(x)
    if ids.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{ids.min()}, {ids.max()}]")
    return ids


def _check_num_classes(num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _preds_and_labels(preds, labels, num_classes):
    num_classes = _check_num_classes(num_classes)
    preds = _class_ids(preds, num_classes, "preds")
    labels = _class_ids(labels, num_classes, "labels")
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels differ in length: {preds.shape[0]} vs {labels.shape[0]}")
    return preds, labels, num_classes


def _float_matrix(x, name):
    """2-D floating torch tensor, kept on its device (numpy input goes to the CPU)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    if not (t.is_floating_point()):
        raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    return t


# --------------------------------------------------------------------------------------------------
# 1. Per-class statistics (bincounts, no loops)
# --------------------------------------------------------------------------------------------------

def per_class_accuracy(preds, labels, num_classes):
    """Top-1 accuracy of each class [C] (fraction); nan for a class without evaluation samples."""
    preds, labels, num_classes = _preds_and_labels(preds, labels, num_classes)
    samples = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels[preds == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(samples > 0, correct / np.maximum(samples, 1), np.nan)


def prediction_counts(preds, num_classes):
    """How many evaluation samples are predicted as each class [C] (Fig. 1b's prediction count)."""
    num_classes = _check_num_classes(num_classes)
    return np.bincount(_class_ids(preds, num_classes, "preds"), minlength=num_classes)


def confusion_matrix(preds, labels, num_classes):
    """[C, C] counts; row = true class, column = predicted class."""
    preds, labels, num_classes = _preds_and_labels(preds, labels, num_classes)
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def head_tail_accuracy(preds, labels, tail_classes):
    """Top-1 over the samples of the tail classes and over all other samples (Sec. 4.1, Fig. 8).

    tail_classes: class indices (or a boolean mask over classes). nan where a group has no samples.
    """
    tail = _to_numpy(tail_classes)
    tail = np.flatnonzero(tail) if tail.dtype == bool else tail.reshape(-1)
    num_classes = int(max(_to_numpy(labels).max(initial=0), _to_numpy(preds).max(initial=0), tail.max(initial=0))) + 1
    preds, labels, _ = _preds_and_labels(preds, labels, num_classes)
    tail = _class_ids(tail, num_classes, "tail_classes")
    in_tail = np.isin(labels, tail)
    correct = preds == labels
    return dict(
        top1_tail=float(correct[in_tail].mean()) if in_tail.any() else math.nan,
        top1_other=float(correct[~in_tail].mean()) if (~in_tail).any() else math.nan,
    )


# --------------------------------------------------------------------------------------------------
# 2. Correlation with class frequency (Sec. 3.1; Appx. A.1, A.3; Fig. 15)
# --------------------------------------------------------------------------------------------------

def correlation(freq, stat, method="spearman", log=False):
    """Spearman's rho (default) or Pearson's r between class frequency and a per-class statistic.

    Pairs where either value is nan/inf (e.g. the accuracy of a class without evaluation samples) are
    left out. log=True correlates with log(1 + freq), which keeps zero-frequency (zero-shot) classes;
    it changes only Pearson, rho is rank-based. Returns nan when fewer than two pairs remain or one
    side is constant (scipy's answer too, without its warning).
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    freq = _to_numpy(freq).astype(np.float64).reshape(-1)
    stat = _to_numpy(stat).astype(np.float64).reshape(-1)
    if freq.shape != stat.shape:
        raise ValueError(f"freq and stat differ in length: {freq.size} vs {stat.size}")
    if log:
        if np.any(freq < 0):
            raise ValueError("log=True needs non-negative frequencies")
        freq = np.log1p(freq)
    keep = np.isfinite(freq) & np.isfinite(stat)
    x, y = freq[keep], stat[keep]
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    if method == "spearman":
        return float(scipy.stats.spearmanr(x, y).statistic)
    return float(scipy.stats.pearsonr(x, y).statistic)


def binned_stats(freq, stat, bins=10):
    """Mean and std of a per-class statistic in frequency bins (Fig. 15: accuracy per frequency bin).

    bins: an int -> up to that many bins holding (nearly) equal numbers of classes, ordered by frequency
    (equal-count bins never come out empty on a long-tailed profile); classes of equal frequency always
    share a bin, so many ties (zero-shot classes) give fewer, larger bins; or a sequence of increasing edges
    -> bins [e0, e1), [e1, e2), ..., [e_{k-1}, e_k] (last one closed). Classes whose statistic is nan are
    left out. Returns one dict per bin: lo, hi (frequency range of the classes in the bin, or the edges),
    count (classes), mean, std (population std, ddof=0).
    """
    freq = _to_numpy(freq).astype(np.float64).reshape(-1)
    stat = _to_numpy(stat).astype(np.float64).reshape(-1)
    if freq.shape != stat.shape:
        raise ValueError(f"freq and stat differ in length: {freq.size} vs {stat.size}")
    keep = np.isfinite(freq) & np.isfinite(stat)
    freq, stat = freq[keep], stat[keep]

    def summary(lo, hi, values):
        return dict(lo=float(lo), hi=float(hi), count=int(values.size),
                    mean=float(values.mean()) if values.size else math.nan,
                    std=float(values.std()) if values.size else math.nan)

    if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        order = np.argsort(freq, kind="stable")
        ranked = freq[order]
        cuts = np.cumsum([g.size for g in np.array_split(order, min(int(bins), max(freq.size, 1)))])[:-1]
        # move each cut past the classes tied with the one before it (a bin never splits a frequency)
        cuts = np.unique(np.searchsorted(ranked, ranked[np.maximum(cuts - 1, 0)], side="right"))
        groups = [g for g in np.split(order, cuts[cuts < freq.size]) if g.size]
        return [summary(freq[g].min(), freq[g].max(), stat[g]) for g in groups]
    edges = np.asarray(bins, dtype=np.float64).reshape(-1)
    if edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("bins as edges must be at least two strictly increasing numbers")
    which = np.searchsorted(edges, freq, side="right") - 1
    which[freq == edges[-1]] = edges.size - 2  # last bin is closed on the right
    return [summary(edges[b], edges[b + 1], stat[which == b]) for b in range(edges.size - 1)]


def read_freq_table(path):
    """A class-frequency table: lines 'classname<TAB>count' -> {classname: count} in file order.

    A minimal reader for the --freq command (data.py owns the project's metadata loaders). Blank lines
    are skipped; a malformed line or a repeated class name raises ValueError naming file and line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"frequency table not found: {path}")
    table, first_line = {}, {}
    with open(path, encoding="utf-8-sig", errors="strict") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        for lineno, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            name = fields[0].strip()
            try:
                if len(fields) != 2 or not name:
                    raise ValueError
                count = float(fields[1])
                if not math.isfinite(count) or count < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected 'classname<TAB>count' with a non-negative "
                                 f"count, got {line!r}") from None
            if name in table:
                raise ValueError(f"{path}:{lineno}: class {name!r} already listed on line {first_line[name]}")
            table[name], first_line[name] = count, lineno
    if not table:
        raise ValueError(f"{path}: no 'classname<TAB>count' lines")
    return table


def freq_table_correlation(table_a, table_b, method="spearman", log=False):
    """Correlation between two frequency tables ({classname: count}) over the classes both list
    (Appx. A.3). Returns dict(value, matched, only_a, only_b) with the unmatched class names."""
    shared = [name for name in table_a if name in table_b]
    return dict(
        value=correlation([table_a[n] for n in shared], [table_b[n] for n in shared], method, log),
        matched=len(shared),
        only_a=[n for n in table_a if n not in table_b],
        only_b=[n for n in table_b if n not in table_a],
    )


# --------------------------------------------------------------------------------------------------
# 3. Neural collapse (Eq. 1, Sec. 3.3)
# --------------------------------------------------------------------------------------------------

def _simplex_etf_gap(vectors, chunk_rows):
    """NC2 of K vectors [K, D] (float64): distance of their cosine Gram matrix from a simplex ETF's.

    G[c, c'] = cos(v_c, v_c') + 1/(K-1) for c != c' (zero for a simplex ETF, whose vectors meet at
    cosine -1/(K-1)). Returns per-class mean over c' != c of |G[c, c']| and per-class |G[c, nn(c)]| with
    nn(c) the most similar other vector. Rows go in chunks so memory stays O(chunk x K), never K x K.
    """
    k = vectors.shape[0]
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    mean_abs, nn_abs = [], []
    for start in range(0, k, chunk_rows):
        rows = torch.arange(start, min(start + chunk_rows, k), device=vectors.device)
        cos = unit[rows] @ unit.T                                  # [rows, K]
        not_self = torch.ones_like(cos, dtype=torch.bool)
        not_self[torch.arange(rows.numel(), device=cos.device), rows] = False
        abs_gap = (cos + 1.0 / (k - 1)).abs() * not_self
        mean_abs.append(abs_gap.sum(dim=1) / (k - 1))
        nearest = cos.masked_fill(~not_self, -math.inf).argmax(dim=1, keepdim=True)
        nn_abs.append(abs_gap.gather(1, nearest).squeeze(1))
    return torch.cat(mean_abs), torch.cat(nn_abs)


def nc_metrics(features, labels, num_classes, classifier=None, *, pinv_rtol=PINV_RTOL):
    """Neural-collapse metrics of features h [N, D] with labels [N] (paper Eq. 1) and of a classifier.

    Over the C classes that have samples (others are nan per class and left out):
      mu_G = mean of all samples; mu_c = class means;
      Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T;
      Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T;
      nc1 = Tr(Sigma_W Sigma_B^+) / C, with ^+ the Moore-Penrose pseudo-inverse (cutoff pinv_rtol);
      per-class nc1[c] = Tr(Sigma_W^c Sigma_B^+), Sigma_W^c the within-class covariance of class c
        (no 1/C; zero for a class with one sample);
      nc2_m from the centred means: G[c, c'] = cos(mu_c - mu_G, mu_c' - mu_G) + 1/(C-1);
        nc2_m = mean over c != c' of |G|, per class mean over c' != c;
        nc2_m_nn[c] = |G[c, nn(c)]|, nn(c) = argmax_{c' != c} cos; nc2_m_nn = mean over classes;
      nc2_w, nc2_w_nn: the same on the classifier rows [num_classes, D'] as given (not centred);
        nan when classifier is None.
    mu_G is the sample mean (Papyan et al.); on an imbalanced evaluation set it differs from the mean of
    the class means, and a simplex ETF of class means then scores nc2_m > 0. The scripts evaluate on
    balanced test sets, where the two agree.
    nc1, nc2_m (and their per-class values) are nan when the class means coincide (Sigma_B = 0 up to
    1e-12 of the total variance): no separation to measure, not perfect collapse.
    features may be None (only the classifier metrics are computed, over the classes in labels).
    All metrics are nan when fewer than two classes have samples. Classifier rows of classes without samples
    are not used (they may be nan).

    Computed in float64 with torch on the device of the inputs. Memory O(C D + D^2 + chunk D): NC1 uses
    Tr(Sigma_W^c Sigma_B^+) = (1/n_c) sum_{i in c} (h_i - mu_c)^T Sigma_B^+ (h_i - mu_c), a row-wise
    quadratic form over chunks of samples summed per class with index_add, so no per-class D x D
    covariance is ever formed.
    """
    num_classes = _check_num_classes(num_classes)
    labels_np = _class_ids(labels, num_classes, "labels")
    nan_per_class = np.full(num_classes, np.nan)
    out = dict(nc1=math.nan, nc2_m=math.nan, nc2_m_nn=math.nan, nc2_w=math.nan, nc2_w_nn=math.nan,
               per_class={key: nan_per_class.copy() for key in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn")})
    counts_np = np.bincount(labels_np, minlength=num_classes)
    present_np = np.flatnonzero(counts_np)
    num_present = present_np.size

    if classifier is not None:
        w = _float_matrix(classifier, "classifier")
        if w.shape[0] != num_classes:
            raise ValueError(f"classifier must have one row per class ({num_classes}), got {w.shape[0]}")
        rows = torch.from_numpy(present_np).to(w.device)
        if not bool(torch.isfinite(w[rows]).all()):
            raise ValueError("classifier contains nan or inf (in a row of a class with evaluation samples)")
        if num_present >= 2:
            per_mean, per_nn = _simplex_etf_gap(w[rows].double(), max(1, _CHUNK_ELEMENTS // num_present))
            out["per_class"]["nc2_w"][present_np] = per_mean.cpu().numpy()
            out["per_class"]["nc2_w_nn"][present_np] = per_nn.cpu().numpy()
            out["nc2_w"], out["nc2_w_nn"] = per_mean.mean().item(), per_nn.mean().item()

    if features is None:
        return out
    h = _float_matrix(features, "features")
    n, dim = h.shape
    if n != labels_np.size:
        raise ValueError(f"features and labels differ in length: {n} vs {labels_np.size}")
    if num_present < 2:
        return out
    device = h.device
    y = torch.from_numpy(labels_np).to(device)
    chunk = max(1, _CHUNK_ELEMENTS // dim)

    # Class sums in float64, a chunk of samples at a time (never a float64 copy of all features).
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    for start in range(0, n, chunk):
        block = h[start:start + chunk].double()
        if not bool(torch.isfinite(block).all()):
            raise ValueError("features contain nan or inf")
        sums.index_add_(0, y[start:start + chunk], block)
    counts = torch.from_numpy(counts_np).to(device=device, dtype=torch.float64)
    present = torch.from_numpy(present_np).to(device)
    global_mean = sums.sum(dim=0) / n
    class_means = sums / counts.clamp_min(1).unsqueeze(1)          # rows of absent classes stay 0, unused
    centred_means = class_means[present] - global_mean             # [C_present, D]
    between_cov = centred_means.T @ centred_means / num_present    # Sigma_B [D, D]
    between_pinv = torch.linalg.pinv(between_cov, rtol=pinv_rtol, hermitian=True)

    # sum over the samples of each class of (h_i - mu_c)^T Sigma_B^+ (h_i - mu_c)
    quad_sums = torch.zeros(num_classes, dtype=torch.float64, device=device)
    within_trace = 0.0
    for start in range(0, n, chunk):
        y_block = y[start:start + chunk]
        diff = h[start:start + chunk].double() - class_means[y_block]
        quad_sums.index_add_(0, y_block, (diff @ between_pinv).mul_(diff).sum(dim=1))
        within_trace += diff.square().sum().item() / n
    between_trace = between_cov.trace().item()
    if not between_trace > 1e-12 * (between_trace + within_trace):  # the class means coincide
        return out
    nc1_per_class = (quad_sums[present] / counts[present]).cpu().numpy()
    out["per_class"]["nc1"][present_np] = nc1_per_class
    out["nc1"] = quad_sums.sum().item() / n / num_present          # Tr(Sigma_W Sigma_B^+) / C

    per_mean, per_nn = _simplex_etf_gap(centred_means, max(1, _CHUNK_ELEMENTS // num_present))
    out["per_class"]["nc2_m"][present_np] = per_mean.cpu().numpy()
    out["per_class"]["nc2_m_nn"][present_np] = per_nn.cpu().numpy()
    out["nc2_m"], out["nc2_m_nn"] = per_mean.mean().item(), per_nn.mean().item()
    return out


# --------------------------------------------------------------------------------------------------
# 4. Classifier affinity (Fig. 9a)
# --------------------------------------------------------------------------------------------------

def affinity_matrix(prototypes, class_list=None):
    """Cosine similarity between class prototypes [C, D] -> [k, k] numpy array, for the classes in
    class_list (indices, in that order) or for all classes."""
    w = _float_matrix(prototypes, "prototypes").double()
    if class_list is not None:
        rows = _class_ids(np.asarray(_to_numpy(class_list)).reshape(-1), w.shape[0], "class_list")
        w = w[torch.from_numpy(rows).to(w.device)]
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (unit @ unit.T).cpu().numpy()


# --------------------------------------------------------------------------------------------------
# Summary of one evaluation, and the run outputs the experiment scripts write
# --------------------------------------------------------------------------------------------------

PER_CLASS_COLUMNS = ["class_index", "class", "frequency", "accuracy", "pred_count",
                     "nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn"]


def summarize(preds, labels, train_counts, features=None, classifier=None, tail_classes=None):
    """All metrics of one evaluation -> (final dict, per-class list of dicts).

    train_counts [C] (training frequency of each class) fixes C. final holds top1, the Spearman
    correlations corr_acc / corr_pred (per-class accuracy / prediction count vs train_counts, classes
    without evaluation samples left out), their Pearson variants on raw and log(1 + count) frequencies
    (corr_acc_pearson, corr_pred_pearson, corr_acc_pearson_log, corr_pred_pearson_log), nc1, nc2_m,
    nc2_m_nn, nc2_w, nc2_w_nn (nan without features / classifier), num_classes, num_eval, and
    top1_tail / top1_other when tail_classes is given.
    """
    train_counts = _to_numpy(train_counts)
    if train_counts.dtype.kind not in "biuf":
        raise ValueError(f"train_counts must be numbers, got dtype {train_counts.dtype}")
    train_counts = train_counts.astype(np.float64).reshape(-1)
    num_classes = train_counts.size
    if num_classes < 1:
        raise ValueError("train_counts is empty")
    if not np.all(np.isfinite(train_counts) & (train_counts >= 0)):
        raise ValueError("train_counts must be finite and non-negative")
    preds, labels, _ = _preds_and_labels(preds, labels, num_classes)
    if labels.size == 0:
        raise ValueError("no evaluation samples")

    accuracy = per_class_accuracy(preds, labels, num_classes)
    pred_count = prediction_counts(preds, num_classes)
    evaluated = np.isfinite(accuracy)                              # classes with evaluation samples
    pred_count_evaluated = np.where(evaluated, pred_count, np.nan)
    nc = nc_metrics(features, labels, num_classes, classifier)

    final = dict(
        top1=float(np.mean(preds == labels)),
        corr_acc=correlation(train_counts, accuracy),
        corr_pred=correlation(train_counts, pred_count_evaluated),
        corr_acc_pearson=correlation(train_counts, accuracy, "pearson"),
        corr_pred_pearson=correlation(train_counts, pred_count_evaluated, "pearson"),
        corr_acc_pearson_log=correlation(train_counts, accuracy, "pearson", log=True),
        corr_pred_pearson_log=correlation(train_counts, pred_count_evaluated, "pearson", log=True),
        **{key: nc[key] for key in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn")},
    )
    if tail_classes is not None:
        tail = _to_numpy(tail_classes)
        if tail.dtype == bool and tail.shape != (num_classes,):
            raise ValueError(f"tail_classes as a mask must have one entry per class ({num_classes}), "
                             f"got shape {tail.shape}")
        tail = np.flatnonzero(tail) if tail.dtype == bool else _class_ids(tail.reshape(-1), num_classes, "tail_classes")
        final.update(head_tail_accuracy(preds, labels, tail))
    final.update(num_classes=num_classes, num_eval=int(labels.size))

    per_class = []
    for c in range(num_classes):
        row = dict(class_index=c, frequency=_plain_number(train_counts[c]), accuracy=float(accuracy[c]),
                   pred_count=int(pred_count[c]))
        row.update({key: float(nc["per_class"][key][c]) for key in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn")})
        per_class.append(row)
    return final, per_class


def _plain_number(x):
    x = float(x)
    return int(x) if x.is_integer() else x


def _json_safe(value):
    """nan/inf -> None (JSON null), numpy scalars/arrays -> Python numbers/lists, other objects -> str."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _json_safe(_to_numpy(value).tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)  # e.g. a pathlib.Path in extra: never fail at the end of a training run


def _atomic_write(path, write, binary=False):
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_per_class_csv(path, per_class, classnames):
    def write_text(f):
        writer = csv.writer(f)
        writer.writerow(PER_CLASS_COLUMNS)
        for row, name in zip(per_class, classnames):
            writer.writerow([row["class_index"], name] + [row[key] for key in PER_CLASS_COLUMNS[2:]])
    _atomic_write(path, write_text)


def _write_final_json(path, final):
    text = json.dumps(_json_safe(final), indent=2, allow_nan=False) + "\n"

    def write_text(f):
        f.write(text)
    _atomic_write(path, write_text)


def write_eval_outputs(out_dir, preds, labels, train_counts, classnames, features=None, classifier=None,
                       tail_classes=None, extra=None):
    """Write a run's evaluation outputs into out_dir and return summarize()'s final dict (+ extra):
      eval.npz      preds, labels, train_counts, classnames, and when given features and classifier
                    (float32), tail_classes;
      final.json    final + extra (nan -> null), written atomically;
      per_class.csv class_index, class, frequency, accuracy, pred_count, nc1, nc2_m, nc2_m_nn, nc2_w,
                    nc2_w_nn.
    `python metrics.py out_dir` recomputes the summary from eval.npz. The features are kept in float32
    (not float16, which would halve the file): NC1 goes through the pseudo-inverse of Sigma_B, whose small
    eigenvalues float16 rounding moves enough to change NC1 two-fold on small synthetic-world runs.
    """
    classnames = [str(name) for name in classnames]
    num_classes = _to_numpy(train_counts).reshape(-1).size
    if len(classnames) != num_classes:
        raise ValueError(f"classnames has {len(classnames)} names but train_counts has {num_classes} classes")
    extra = dict(extra or {})
    final, per_class = summarize(preds, labels, train_counts, features, classifier, tail_classes)
    clash = sorted(set(extra) & set(final))
    if clash:
        raise ValueError(f"extra must not override computed metrics: {clash}")
    final.update(extra)
    os.makedirs(out_dir, exist_ok=True)

    arrays = dict(preds=_to_numpy(preds).astype(np.int64), labels=_to_numpy(labels).astype(np.int64),
                  train_counts=_to_numpy(train_counts).reshape(-1), classnames=np.array(classnames, dtype=str))
    if features is not None:
        arrays["features"] = _to_numpy(features).astype(np.float32)
    if classifier is not None:
        arrays["classifier"] = _to_numpy(classifier).astype(np.float32)
    if tail_classes is not None:
        tail = _to_numpy(tail_classes)
        arrays["tail_classes"] = np.flatnonzero(tail) if tail.dtype == bool else tail.astype(np.int64).reshape(-1)

    _atomic_write(os.path.join(out_dir, "eval.npz"), lambda f: np.savez(f, **arrays), binary=True)
    _write_final_json(os.path.join(out_dir, "final.json"), final)
    _write_per_class_csv(os.path.join(out_dir, "per_class.csv"), per_class, classnames)
    return final


def write_extra_eval_outputs(run_dir, name, preds, labels, train_counts, classnames, features=None,
                             classifier=None, tail_classes=None):
    """write_eval_outputs for an extra evaluation set (--extra-eval NAME=DIR, e.g. ImageNet-V2) into
    run_dir/extra-NAME/; returns its headline numbers as the run's final.json keeps them:
    top1_NAME, corr_acc_NAME, corr_pred_NAME."""
    sub = write_eval_outputs(os.path.join(run_dir, f"extra-{name}"), preds, labels, train_counts, classnames,
                             features, classifier, tail_classes)
    return {f"{key}_{name}": sub[key] for key in ("top1", "corr_acc", "corr_pred")}


def load_eval(run_dir):
    """Read run_dir/eval.npz -> dict of the arrays write_eval_outputs stored (missing ones None)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    path = os.path.join(run_dir, "eval.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no eval.npz in {run_dir} (write_eval_outputs writes it at the end of a run)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except Exception as e:  # zip / format errors come in many types
        raise ValueError(f"cannot read {path}: {e}") from None
    missing = [key for key in ("preds", "labels", "train_counts", "classnames") if key not in data]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    for key in ("features", "classifier", "tail_classes"):
        data.setdefault(key, None)
    if data["features"] is not None and data["features"].dtype == np.float16:
        warnings.warn(f"{path} keeps float16 features (written before 2026-11-26): the NC values recomputed "
                      "from them can differ from the run's (NC1 up to ~2x on small runs)")
    names, counts = data["classnames"], data["train_counts"]
    if names.ndim != 1 or counts.ndim != 1 or names.size != counts.size:
        raise ValueError(f"{path}: classnames {names.shape} and train_counts {counts.shape} must be 1-D and "
                         "of equal length (one per class)")
    return data


# --------------------------------------------------------------------------------------------------
# 5. Linear-probe evaluation (Appx. D.3, Table 2), as in ssl-transfer (the paper's evaluation code)
# --------------------------------------------------------------------------------------------------
# Frozen features, l2-regularised multinomial logistic regression fitted with L-BFGS, minimising
# sum_i CE_i + (lambda / 2) ||W||^2 (bias not regularised; lambda = 1 / C of scikit-learn), lambda chosen
# from REGULARISATION_GRID on a validation split. Multi-label sets (VOC2007): one-vs-rest logistic
# regressions scored by 11-point mAP.

REGULARISATION_GRID = np.logspace(-6, 5, 45)


def fit_logistic_regression(x, y, num_classes, l2, multilabel=False, init=None, max_iter=200, tol=1e-7):
    """Returns (W [F, C], b [C]) minimising mean loss + l2 / (2N) ||W||^2 (same minimiser as the sum form);
    stops when the largest gradient entry of that mean objective is below tol, or after max_iter iterations."""
    x = x.double()
    n = len(x)
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    target = y.double() if multilabel else y
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n
        else:
            loss = F.cross_entropy(logits, target)
        loss = loss + l2 / (2 * n) * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def eleven_point_ap(scores, positives):
    """PASCAL VOC 2007 average precision: mean over recall levels 0, 0.1, ..., 1 of the best precision at
    recall >= level (precision/recall at every distinct score threshold)."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order]
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]  # end of each tie group
    tp = np.cumsum(positives)[last]
    precision, recall = tp / (last + 1), tp / max(positives.sum(), 1)
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.linspace(0, 1, 11)]))


def probe_scores(x, y, w, b, num_classes, metric):
    """top1, mean per-class accuracy (single-label) or 11-point mAP (multi-label); 'score' = the task's metric."""
    logits = x.double() @ w + b
    if metric == "map11":
        aps = [eleven_point_ap(logits[:, c].cpu().numpy(), y[:, c].cpu().numpy()) for c in range(num_classes)]
        return dict(map11=float(np.mean(aps)), score=float(np.mean(aps)))
    preds = logits.argmax(dim=1).cpu().numpy()
    labels = y.cpu().numpy()
    top1 = float((preds == labels).mean())
    mean_per_class = float(np.nanmean(per_class_accuracy(preds, labels, num_classes)))
    return dict(top1=top1, mean_per_class=mean_per_class, score=mean_per_class if metric == "mean_per_class" else top1)


def select_regularisation(x_train, y_train, x_val, y_val, num_classes, metric, grid=REGULARISATION_GRID,
                          max_iter=200, tol=1e-7):
    """The lambda of `grid` with the best validation score (first one on ties, ascending as ssl-transfer);
    warm-started fits along the grid. Only the train and validation splits are seen here."""
    multilabel = metric == "map11"
    best, scores, init = None, [], None
    for l2 in grid:
        init = fit_logistic_regression(x_train, y_train, num_classes, float(l2), multilabel, init, max_iter, tol)
        score = probe_scores(x_val, y_val, *init, num_classes, metric)["score"]
        scores.append(score)
        if best is None or score > best[1]:
            best = (float(l2), score)
    return best[0], scores


# --------------------------------------------------------------------------------------------------
# 6. Command line
# --------------------------------------------------------------------------------------------------

def _fmt(x, digits=4):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _print_run_summary(run_dir, final, per_class, bins):
    print(f"run: {run_dir}  ({final['num_classes']} classes, {final['num_eval']} evaluation samples)")
    print(f"  top-1 accuracy                       {_fmt(final['top1'])}")
    if "top1_tail" in final:
        print(f"  top-1 tail / other classes           {_fmt(final['top1_tail'])} / {_fmt(final['top1_other'])}")
    print("  correlation with training frequency  per-class accuracy | prediction count")
    print(f"    Spearman rho                       {_fmt(final['corr_acc']):>18} | {_fmt(final['corr_pred'])}")
    print(f"    Pearson r                          {_fmt(final['corr_acc_pearson']):>18} | {_fmt(final['corr_pred_pearson'])}")
    print(f"    Pearson r, log(1 + frequency)      {_fmt(final['corr_acc_pearson_log']):>18} | {_fmt(final['corr_pred_pearson_log'])}")
    print("  neural collapse (lower = more collapsed)")
    print(f"    NC1  {_fmt(final['nc1'])}   NC2_M {_fmt(final['nc2_m'])}   NC2_M^nn {_fmt(final['nc2_m_nn'])}"
          f"   NC2_W {_fmt(final['nc2_w'])}   NC2_W^nn {_fmt(final['nc2_w_nn'])}")
    freq = [row["frequency"] for row in per_class]
    acc = [row["accuracy"] for row in per_class]
    print("  per-class accuracy by training frequency (equal-count bins)")
    print("    frequency range        classes   mean acc   std")
    for b in binned_stats(freq, acc, bins):
        print(f"    {_fmt(b['lo'], 0):>8} - {_fmt(b['hi'], 0):<10}   {b['count']:>7}   {_fmt(b['mean']):>8}   {_fmt(b['std'])}")


def _recompute_run(run_dir, write, bins):
    data = load_eval(run_dir)
    final, per_class = summarize(data["preds"], data["labels"], data["train_counts"], data["features"],
                                 data["classifier"], data["tail_classes"])
    _print_run_summary(run_dir, final, per_class, bins)
    if write:
        # Keep what the training script added to final.json (extra=...), replace the metrics.
        old_path = os.path.join(run_dir, "final.json")
        old = {}
        if os.path.isfile(old_path):
            try:
                with open(old_path) as f:
                    old = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {old_path}: {e}") from None
            if not isinstance(old, dict):
                raise ValueError(f"{old_path} does not hold a JSON object")
        # metrics of the run's own evaluation that this one does not produce (top1_tail without a tail)
        stale = {"top1_tail", "top1_other"} - set(final)
        _write_final_json(old_path, {**{k: v for k, v in old.items() if k not in stale}, **final})
        _write_per_class_csv(os.path.join(run_dir, "per_class.csv"), per_class, [str(n) for n in data["classnames"]])
        print(f"wrote {old_path} and {os.path.join(run_dir, 'per_class.csv')}")


def _correlate_tables(paths, method, log):
    tables = [read_freq_table(p) for p in paths]
    name = "Spearman rho" if method == "spearman" else "Pearson r"
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            r = freq_table_correlation(tables[i], tables[j], method, log)
            unmatched = len(r["only_a"]) + len(r["only_b"])
            print(f"{name}{' (log(1 + count))' if log and method == 'pearson' else ''} = {_fmt(r['value'])}"
                  f"  over {r['matched']} shared classes ({unmatched} unmatched): {paths[i]} vs {paths[j]}")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse's default adds the usage text)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    parser = _ArgumentParser(prog="metrics.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a run folder holding eval.npz")
    parser.add_argument("--write", action="store_true", help="rewrite final.json and per_class.csv of run_dir "
                        "(eval.npz files with float16 features, written before 2026-11-26, give a different NC1)")
    parser.add_argument("--bins", type=int, default=5, help="frequency bins in the run summary (default 5)")
    parser.add_argument("--freq", action="append", metavar="TABLE",
                        help="a 'classname<TAB>count' table; give two or more to correlate them")
    parser.add_argument("--method", choices=["spearman", "pearson"], default="spearman")
    parser.add_argument("--log", action="store_true", help="Pearson on log(1 + count)")
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.freq is None):
        parser.error("give either a run folder or --freq tables (two or more)")
    if args.freq is not None and len(args.freq) < 2:
        parser.error("--freq needs at least two tables to correlate")
    if args.bins < 1:
        parser.error("--bins must be at least 1")
    try:
        if args.freq is not None:
            _correlate_tables(args.freq, args.method, args.log)
        else:
            _recompute_run(args.run_dir, args.write, args.bins)
    except (ValueError, OSError) as e:
        parser.exit(2, f"metrics.py: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
