"""dino_tail.py: prototype subsampling, utilisation counts, the linear probe, multi-crop pieces, and the run
(bad flags, exact resume after SIGKILL, one vs two processes)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from open_clip.modified_resnet import AttentionPool2d

import classes
import dino_tail
import metrics
import runtime
import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- prototype subsampling -------------------------------------------------------------------------------

def test_sample_prototypes_is_a_sorted_uniform_subset():
    idx = dino_tail.sample_prototypes(1000, 64, dino_tail.prototype_generator(3, 1, 7))
    assert idx.dtype == torch.int64 and len(idx) == 64 and len(torch.unique(idx)) == 64
    assert torch.all(idx[1:] > idx[:-1]) and idx.min() >= 0 and idx.max() < 1000
    again = dino_tail.sample_prototypes(1000, 64, dino_tail.prototype_generator(3, 1, 7))
    other = dino_tail.sample_prototypes(1000, 64, dino_tail.prototype_generator(3, 1, 8))
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    assert torch.equal(dino_tail.sample_prototypes(50, 0, None), torch.arange(50))
    # uniform: over many iterations every prototype is drawn about V/K of the time
    counts = torch.zeros(100)
    for step in range(2000):
        counts[dino_tail.sample_prototypes(100, 10, dino_tail.prototype_generator(0, 0, step))] += 1
    assert abs(counts.mean().item() - 200) < 1e-9 and counts.min() > 140 and counts.max() < 260


def _idx_worker(rank, world_size, init_file, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(1234 + 99 * rank)  # each rank's global RNG differs; the draw must not depend on it
    torch.rand(rank * 5 + 1)
    draws = torch.stack([dino_tail.sample_prototypes(4096, 256, dino_tail.prototype_generator(0, epoch, step))
                         for epoch in range(2) for step in range(5)])
    gathered = [torch.zeros_like(draws) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, draws)
    if rank == 0:
        torch.save(gathered, out_file)
    torch.distributed.destroy_process_group()


def test_every_rank_gets_the_same_idx(tmp_path):
    """Two gloo processes with different global RNG states draw identical subsets at every (epoch, step)."""
    out = str(tmp_path / "draws.pt")
    torch.multiprocessing.spawn(_idx_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    rank0, rank1 = torch.load(out)
    assert torch.equal(rank0, rank1)
    assert len({tuple(row.tolist()) for row in rank0}) == len(rank0)  # a fresh subset every iteration


# ---- utilisation ---------------------------------------------------------------------------------------

def _unit(*v):
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.norm()


def _rotated(base, other, cos):
    """A unit vector at cosine `cos` from unit `base`, in the plane of base and other."""
    o = other - (other @ base) * base
    o = o / o.norm()
    return cos * base + (1 - cos ** 2) ** 0.5 * o


def test_count_distinct_prototypes_hand_made():
    e = torch.eye(6, dtype=torch.float64)
    near_e0 = _rotated(e[0], e[1], 0.99)          # a near-duplicate of e0 (cos 0.99 > 0.975)
    chain1 = _rotated(e[2], e[3], 0.98)           # e2 - chain1 - chain2: neighbours at cos 0.98 ...
    chain2 = _rotated(chain1, e[4], 0.98)
    assert (e[2] @ chain2) < 0.975                # ... while the ends are farther apart: merged transitively
    far = _rotated(e[5], e[0], 0.9)               # cos 0.9: distinct from e5
    w = torch.stack([e[0], near_e0, e[2], chain1, chain2, e[5], far, e[0].clone()])
    # components: {e0, near_e0, e0 copy}, {e2, chain1, chain2}, {e5}, {far}
    assert dino_tail.count_distinct_prototypes(w, eps=0.025) == 4
    assert dino_tail.count_distinct_prototypes(w, eps=0.025, chunk=3) == 4
    assert dino_tail.count_distinct_prototypes(w, eps=0.15) == 3     # cos 0.9 > 0.85 now merges far into e5
    assert dino_tail.count_distinct_prototypes(w, eps=1e-4) == 7     # only the exact copy merges
    assert dino_tail.count_distinct_prototypes(w[torch.randperm(8)], eps=0.025) == 4
    assert dino_tail.count_distinct_prototypes(3.0 * w, eps=0.025) == 4  # cosine, not dot product


def test_argmax_winners_and_prototype_utilisation_hand_made():
    assert dino_tail.count_argmax_winners(torch.tensor([3, 3, 0, 7, 3]), 10) == 3

    class Features(torch.utils.data.Dataset):  # items (image, label); "images" are already embeddings
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], 0

    protos = torch.eye(4)                                   # prototype j = e_j
    x = torch.tensor([[1.0, 0.2, 0, 0], [0.9, 0, 0.1, 0], [0, 0, 1, 0], [0, 0, 0.8, 0.9]])
    head = dino_tail.DINOHead(4, 4, 8, 4)
    head.mlp = nn.Identity()
    head.prototypes.data.copy_(protos)
    model = dino_tail.DINOModel(nn.Identity(), head)
    args = type("A", (), dict(workers=0, utilisation_eps=0.025))()
    dist = runtime.Dist()
    # winners by hand: argmax of cos(x, e_j) - centre_j: rows -> 0, 0, 2, 3
    got = dino_tail.prototype_utilisation(model, torch.zeros(4), Features(x), args, dist)
    assert got == dict(argmax_winners=3, distinct_prototypes=4, prototypes=4)
    # a centre penalising prototype 3 moves row 3's win to prototype 2: rows -> 0, 0, 2, 2
    got = dino_tail.prototype_utilisation(model, torch.tensor([0, 0, 0, 0.5]), Features(x), args, dist)
    assert got["argmax_winners"] == 2


# ---- linear probe ----------------------------------------------------------------------------------------

def _objective_numpy(params, x, y, num_classes, l2, multilabel):
    """sum_i loss_i + l2/2 ||W||^2 (bias unregularised) and its gradient, in numpy: scikit-learn's objective
    with C = 1/l2, the one ssl-transfer's linear probe minimises."""
    f = x.shape[1]
    w, b = params[: f * num_classes].reshape(f, num_classes), params[f * num_classes:]
    z = x @ w + b
    if multilabel:
        loss = np.sum(np.logaddexp(0, z) - y * z)
        dz = scipy.special.expit(z) - y
    else:
        lse = scipy.special.logsumexp(z, axis=1)
        loss = np.sum(lse - z[np.arange(len(y)), y])
        dz = np.exp(z - lse[:, None])
        dz[np.arange(len(y)), y] -= 1
    loss += 0.5 * l2 * np.sum(w * w)
    grad = np.concatenate([(x.T @ dz + l2 * w).ravel(), dz.sum(0)])
    return loss, grad


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("l2", [0.3, 20.0])
def test_logistic_regression_matches_scipy(multilabel, l2):
    rng = np.random.default_rng(0)
    n, f, c = 80, 6, 4
    x = rng.normal(size=(n, f))
    w_true = rng.normal(size=(f, c)) * 2
    if multilabel:
        y = (x @ w_true + rng.normal(size=(n, c)) > 0).astype(np.float64)
    else:
        y = np.argmax(x @ w_true + rng.gumbel(size=(n, c)), axis=1)
    ref = scipy.optimize.minimize(_objective_numpy, np.zeros(f * c + c), args=(x, y, c, l2, multilabel), jac=True,
                                  method="L-BFGS-B", options=dict(maxiter=5000, ftol=1e-15, gtol=1e-12))
    w, b = metrics.fit_logistic_regression(torch.tensor(x), torch.tensor(y), c, l2, multilabel, max_iter=500, tol=1e-10)
    ours = np.concatenate([w.numpy().ravel(), b.numpy()])
    np.testing.assert_allclose(ours, ref.x, rtol=1e-5, atol=1e-6)
    _, grad = _objective_numpy(ours, x, y, c, l2, multilabel)
    assert np.abs(grad).max() < 1e-5 * n  # a stationary point of the sum objective


def test_logistic_regression_separable_closed_form():
    """Two points x = +1 (label 1) and x = -1 (label 0), one feature. With g = w1 - w0 the logit gap per unit
    x, the sum objective is 2 log(1 + exp(-g)) + l2/2 (w0^2 + w1^2), minimised at w1 = -w0 = g/2 (bias gap 0
    by symmetry), i.e. where 2 / (1 + exp(g)) = l2 g / 2."""
    x = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    l2 = 0.5
    w, b = metrics.fit_logistic_regression(x, y, 2, l2, max_iter=500, tol=1e-12)
    gap = (w[0, 1] - w[0, 0]).item()  # the multinomial model's logit gap per unit x
    root = scipy.optimize.brentq(lambda g: 2 / (1 + np.exp(g)) - l2 * g / 2, 1e-9, 50)
    assert abs(gap - root) < 1e-6 and abs(b[1] - b[0]) < 1e-8


def test_eleven_point_ap_hand_made():
    # ranked: pos, neg, pos, neg -> (P, R) at the 4 thresholds: (1, .5) (.5, .5) (2/3, 1) (.5, 1)
    ap = metrics.eleven_point_ap([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert abs(ap - (6 * 1.0 + 5 * (2 / 3)) / 11) < 1e-12
    assert metrics.eleven_point_ap([0.1, 0.9, 0.5], [1, 1, 1]) == 1.0
    # tied scores form one threshold: two items at 0.5, one positive -> P = 1/2 at R = 1
    assert abs(metrics.eleven_point_ap([0.5, 0.5], [1, 0]) - 0.5) < 1e-12
    assert metrics.eleven_point_ap([0.3, 0.2], [0, 0]) == 0.0


def _probe_task(seed=0, n=240, f=8, c=3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, f)) * 1.2
    def split(m):
        y = rng.integers(0, c, m)
        return torch.tensor(centres[y] + rng.normal(size=(m, f))), torch.tensor(y)
    return dict(num_classes=c, metric="top1", train=split(n), val=split(n // 4), test=split(n))


def test_regularisation_is_chosen_on_validation_data_only():
    task = _probe_task()
    grid = np.logspace(-2, 4, 7)
    (x_tr, y_tr), (x_val, y_val) = task["train"], task["val"]
    chosen, scores = metrics.select_regularisation(x_tr, y_tr, x_val, y_val, 3, "top1", grid=grid, max_iter=500,
                                                    tol=1e-10)
    # independent: scipy fit per value, validation accuracy, first best
    by_hand = []
    for l2 in grid:
        p = scipy.optimize.minimize(_objective_numpy, np.zeros(8 * 3 + 3), args=(x_tr.numpy(), y_tr.numpy(), 3, l2, False),
                                    jac=True, method="L-BFGS-B", options=dict(maxiter=5000, ftol=1e-15, gtol=1e-12)).x
        pred = np.argmax(x_val.numpy() @ p[:24].reshape(8, 3) + p[24:], axis=1)
        by_hand.append(float((pred == y_val.numpy()).mean()))
    np.testing.assert_allclose(scores, by_hand)
    assert chosen == grid[int(np.argmax(by_hand))]
    # the test split plays no part: scrambling its labels changes the score, never the choice
    result, _ = dino_tail.linear_probe(task, max_iter=500)
    scrambled = dict(task, test=(task["test"][0], task["test"][1][torch.randperm(len(task["test"][1]))]))
    result_scrambled, _ = dino_tail.linear_probe(scrambled, max_iter=500)
    assert result["l2"] == result_scrambled["l2"] and result["best_val"] == result_scrambled["best_val"]
    # the default grid: 45 log-spaced values in [1e-6, 1e5] (Appx. D.3)
    assert result["l2"] in set(metrics.REGULARISATION_GRID) and len(metrics.REGULARISATION_GRID) == 45
    assert metrics.REGULARISATION_GRID[0] == pytest.approx(1e-6) and metrics.REGULARISATION_GRID[-1] == pytest.approx(1e5)


def test_probe_refits_on_train_plus_val_and_reports_metrics():
    task = _probe_task(seed=1)
    result, logits = dino_tail.linear_probe(task, max_iter=300)
    x = torch.cat([task["train"][0], task["val"][0]])
    y = torch.cat([task["train"][1], task["val"][1]])
    w, b = metrics.fit_logistic_regression(x, y, 3, result["l2"], max_iter=300)
    torch.testing.assert_close(logits, task["test"][0].double() @ w + b)
    preds = logits.argmax(1)
    assert result["top1"] == pytest.approx((preds == task["test"][1]).double().mean().item())
    per_class = [(preds[task["test"][1] == k] == k).double().mean().item() for k in range(3)]
    assert result["mean_per_class"] == pytest.approx(np.mean(per_class))
    assert result["top1"] > 0.6  # well-separated classes


# ---- model and augmentation ------------------------------------------------------------------------------

def test_resizable_attention_pool_matches_open_clip_at_native_size():
    torch.manual_seed(0)
    pool = AttentionPool2d(2, 32, 4, 16)
    resizable = dino_tail.ResizableAttentionPool2d(2, 32, 4, 16)
    resizable.load_state_dict(pool.state_dict())
    x = torch.randn(3, 32, 2, 2)
    torch.testing.assert_close(resizable(x), pool(x))
    assert resizable(torch.randn(3, 32, 1, 1)).shape == (3, 16)  # a smaller (local-crop) grid works too


def test_model_embeds_multicrop_lists_crop_major():
    args = dino_tail.parse_args(["--prototypes", "32", "--hidden-dim", "16", "--bottleneck-dim", "8",
                                 "--global-size", "64", "--local-size", "32"])
    torch.manual_seed(0)
    model = dino_tail.build_model(args).eval()
    crops = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    emb, protos = model(crops)
    assert emb.shape == (6, 8) and protos.shape == (32, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(emb[4:], model.head(model.backbone(crops[2])))  # crop-major order


def test_photometric_identity_and_blur():
    x = torch.rand(3, 3, 32, 32)
    neutral = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0]] * 3, dtype=torch.float32)
    mean = torch.tensor(sources.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(sources.CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(dino_tail.photometric_augment(x, neutral), (x - mean) / std)
    jitter_neutral = neutral.clone()
    jitter_neutral[:, 0] = 1  # jitter on with neutral factors (hue 0) changes nothing either
    torch.testing.assert_close(dino_tail.photometric_augment(x, jitter_neutral), (x - mean) / std, atol=1e-5, rtol=0)
    solarize = neutral.clone()
    solarize[:, 7] = 1
    torch.testing.assert_close(dino_tail.photometric_augment(x, solarize) * std + mean, torch.where(x >= 0.5, 1 - x, x))
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(dino_tail.gaussian_blur(flat, torch.tensor([1.5])), flat)  # blur keeps a constant
    blurred = dino_tail.gaussian_blur(x, torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(blurred[0], x[0])
    assert blurred[2].std() < blurred[1].std() < x[1].std()


def test_multicrop_transform_is_seeded_per_sample():
    mc = dino_tail.MultiCropTransform((0.14, 1), (0.05, 0.14), 3, 32, 32)
    img = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    torch.manual_seed(5)
    crops, params = mc(img)
    torch.manual_seed(5)
    crops2, params2 = mc(img)
    assert len(crops) == 5 and params.shape == (5, dino_tail.PHOTO_PARAMS)
    assert all(torch.equal(a, b) for a, b in zip(crops, crops2)) and torch.equal(params, params2)
    assert params[0, 6] > 0 and params[1, 7] in (0, 1) and params[0, 7] == 0  # global 1 always blurred


def test_multicrop_interpolation_follows_the_recipe():
    """Crops are resampled bicubically under --recipe paper (DINO's RandomResizedCrop), bilinearly by default.
    A crop scale of (1, 1) crops the whole square image, so each global crop is a plain resize (maybe flipped)."""
    assert dino_tail.parse_args(["--recipe", "paper"]).crop_interpolation == "bicubic"
    assert dino_tail.parse_args([]).crop_interpolation == "bilinear"
    img = torch.rand(3, 32, 32)
    for mode in ("bicubic", "bilinear"):
        mc = dino_tail.MultiCropTransform((1, 1), (0.05, 0.14), 0, 24, 24, mode)
        crops, _ = mc(img)
        expected = T.functional.resize(img, [24, 24], T.InterpolationMode(mode), antialias=True).clamp(0, 1)
        other = T.functional.resize(img, [24, 24], T.InterpolationMode({"bicubic": "bilinear", "bilinear": "bicubic"}[mode]),
                                    antialias=True).clamp(0, 1)
        for crop in crops:
            assert torch.allclose(crop, expected) or torch.allclose(crop, expected.flip(-1))
            assert not torch.allclose(crop, other) and not torch.allclose(crop, other.flip(-1))


def plain_sinkhorn_knopp(teacher_logits, tau_t, iters):
    """The released main_dino.py's sinkhorn_knopp_teacher (one process), written out: Q = exp(t / tau)^T,
    divided by its sum, then `iters` times rows (prototypes) to 1/K each and columns (samples) to 1/B each;
    returns B Q^T, one distribution per sample."""
    q = torch.exp(teacher_logits / tau_t).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def test_sinkhorn_knopp_equipartitions():
    torch.manual_seed(0)
    logits = torch.randn(12, 5, dtype=torch.float64) * 3
    q = plain_sinkhorn_knopp(logits, 0.5, 200)
    torch.testing.assert_close(q.sum(1), torch.ones(12, dtype=torch.float64))              # a distribution per row
    torch.testing.assert_close(q.sum(0), torch.full((5,), 12 / 5, dtype=torch.float64), rtol=1e-4, atol=1e-4)  # equal mass per column


def test_sinkhorn_targets_through_the_fused_op_equal_the_plain_computation():
    """--teacher sinkhorn (the released main_dino.py's targets) as a centre for the fused op: the loss equals
    the cross-entropy between the plain Sinkhorn-Knopp targets and the student softmax, and its gradient too."""
    torch.manual_seed(0)
    B, D, K, V, n_global, n_crops = 6, 16, 50, 30, 2, 4
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=1)
    student, teacher, w = unit(n_crops * B, D).requires_grad_(), unit(n_global * B, D), unit(K, D)
    idx = torch.randperm(K)[:V].sort().values
    args = type("Args", (), dict(teacher="sinkhorn", teacher_temp=0.04, student_temp=0.1, sinkhorn_iters=3))()
    loss, _ = dino_tail.dino_loss(student, teacher, w, w, idx, torch.zeros(K, dtype=torch.float64), args, n_global,
                                  n_crops, runtime.Dist())
    targets = plain_sinkhorn_knopp(teacher @ w[idx].T, 0.04, 3).chunk(n_global)
    log_p = torch.log_softmax(student @ w[idx].T / 0.1, dim=1).chunk(n_crops)
    terms = [-(q * log_p[v]).sum(1).mean() for g, q in enumerate(targets) for v in range(n_crops) if v != g]
    expected = sum(terms) / len(terms)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    grad, = torch.autograd.grad(loss, student)
    expected_grad, = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-10)
    # the centre makes every prototype's total target mass nearly equal (3 iterations: approximately)
    centre = dino_tail.sinkhorn_centre(teacher @ w[idx].T, 0.04, 200, runtime.Dist())
    q = torch.softmax((teacher @ w[idx].T - centre) / 0.04, dim=1)
    torch.testing.assert_close(q.sum(0), torch.full((V,), n_global * B / V, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_cosine_schedule():
    s = dino_tail.cosine_schedule(1.0, 0.0, 10, warmup_steps=2)
    assert len(s) == 10 and s[0] == 0.0 and s[1] == 0.5 and s[2] == 1.0 and s[-1] > 0 and np.all(np.diff(s[2:]) < 0)


# ---- the run ---------------------------------------------------------------------------------------------

TINY = ["--num-train", "96", "--classes", "rand8", "--num-test-per-class", "2", "--batch-size", "32",
        "--prototypes", "64", "--hidden-dim", "32", "--bottleneck-dim", "16", "--transfer", "none"]


def _run(args, env_extra=None, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "dino_tail.py"] + args, cwd=REPO, env=env, capture_output=True, text=True,
                          **kw)


@pytest.mark.parametrize("flags,message", [
    (["--voc", "100", "--prototypes", "64"], "--voc 100 is larger than the 64 prototypes"),
    (["--global-size", "40"], "multiples of 32"),
    (["--probe-image-size", "16"], "--probe-image-size must be >= 32"),
    (["--extra-eval", "x=/tmp"], "dino_tail.py evaluates by linear probes"),
    (["--min-lr", "1"], "--min-lr in [0, --lr]"),
    (["--clip-grad", "-1"], "--clip-grad >= 0"),
    (["--utilisation-eps", "-1"], "--utilisation-eps must be in [0, 2]"),
    (["--warmup-epochs", "1000"], "must not exceed --epochs"),
    (["--transfer", "cifar10"], "needs --data other than synthetic"),
    (["--transfer-root", "/data/transfer"], "--transfer-root holds real transfer sets, which need --data other"),
    (["--data", "imagefolder", "--transfer", "novel"], "needs --data synthetic"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--teacher-momentum", "1.5"], "must lie in [0, 1]"),
    (["--seed", "-1"], "--seed and --freeze-last-layer must be >= 0"),
    (["--sinkhorn-iters", "0"], "--sinkhorn-iters must be >= 1"),
    # transfer tasks are checked before pre-training starts, not after it
    (["--probe-classes", "0"], "--probe-classes must be in [1, 1000]"),
    (["--data", "imagefolder", "--transfer", "cifar-10"], "unknown data set"),
    (["--data", "imagefolder", "--transfer", "cifar10"], "needs --transfer-root"),
])
def test_bad_flags_are_rejected(flags, message):
    with pytest.raises(ValueError, match=re_escape(message)):
        dino_tail.parse_args(flags)


@pytest.mark.parametrize("flags,message", [
    (["--transfer", "cifar10", "--transfer-root", "/nonexistent"], "no folder /nonexistent/cifar10"),
    (["--transfer", "folder:/nonexistent"], "expected ImageFolders /nonexistent/train"),
])
def test_missing_transfer_folders_stop_the_run_before_pre_training(flags, message, tmp_path, monkeypatch):
    monkeypatch.setattr(dino_tail.data, "load_data", lambda *a, **k: pytest.fail("pre-training data was loaded"))
    with pytest.raises(FileNotFoundError, match=re_escape(message)):
        dino_tail.main(["--data", "imagefolder", "--data-root", str(tmp_path), *flags, "--out", str(tmp_path / "run")])


def test_recipes():
    paper = dino_tail.parse_args(["--recipe", "paper"])
    # DINO's ResNet-50 recipe (SGD, base lr 0.03, wd 1e-4, crop scales 0.14-1 / 0.05-0.14), 65,536 prototypes,
    # and DINO's default of one epoch with the last layer frozen
    assert (paper.model, paper.batch_size, paper.lr, paper.weight_decay, paper.global_scale, paper.local_scale,
            paper.prototypes, paper.freeze_last_layer) == ("rn50", 1024, 0.03 * 1024 / 256, 1e-4, (0.14, 1.0),
                                                           (0.05, 0.14), 65536, 1)
    assert dino_tail.parse_args([]).freeze_last_layer == 0
    assert dino_tail.parse_args(["--recipe", "paper", "--freeze-last-layer", "0"]).freeze_last_layer == 0


def test_probe_transform():
    """Probe images at the backbone's training resolution (--global-size), real ones made RGB."""
    from PIL import Image
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    native = dino_tail.probe_transform(dino_tail.parse_args([]))(image)
    assert native.shape == (3, 32, 32)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (sources.CLIP_MEAN, sources.CLIP_STD))
    torch.testing.assert_close(native, (image / 255 - mean) / std)
    up = dino_tail.probe_transform(dino_tail.parse_args(["--global-size", "64", "--local-size", "32"]))(image)
    by_hand = F.interpolate(image[None].float(), size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(up, ((by_hand[0].round().clamp(0, 255) / 255 - mean) / std), atol=2 / 255 / 0.26, rtol=0)
    grey = Image.fromarray(np.arange(50 * 70, dtype=np.uint8).reshape(50, 70) % 251, mode="L")
    real = dino_tail.probe_transform(dino_tail.parse_args(["--data", "imagefolder", "--global-size", "64",
                                                           "--local-size", "32"]))(grey)
    assert real.shape == (3, 64, 64)
    torch.testing.assert_close(real[0] * std[0] + mean[0], real[1] * std[1] + mean[1])  # grey made RGB


class _PixelFeatures(nn.Module):
    output_dim = 12

    def forward(self, images):
        return images.flatten(1)[:, :12].float()


def test_a_novel_probe_without_novel_classes_stops_before_pre_training(tmp_path, monkeypatch):
    monkeypatch.setattr(dino_tail, "build_model", lambda *a: pytest.fail("pre-training started"))
    with pytest.raises(ValueError, match="--probe-classes 1 leaves 0 classes outside pre-training"):
        dino_tail.main(["--probe-classes", "1", "--classes", "in1k", "--num-train", "1000",
                        "--cache-dir", str(tmp_path), "--out", str(tmp_path / "run")])


def test_novel_task_leaves_out_open_world_concepts(tmp_path):
    """'novel' = ImageNet classes pre-training never saw: neither its labelled classes nor the open-world
    concepts in its images."""
    flags = ["--classes", "rand20", "--cache-dir", str(tmp_path), "--probe-classes", "300",
             "--probe-train-per-class", "1", "--probe-test-per-class", "1"]
    args = dino_tail.parse_args([*flags, "--open-world", "200", "--num-train", "400"])
    pretrain = dino_tail.data.load_data(args, need_test=False)
    seen = set(pretrain.imagenet_ids) | set(pretrain.open_world_ids)
    assert len(pretrain.open_world_ids) == 200 and not set(pretrain.imagenet_ids) & set(pretrain.open_world_ids)
    task = dino_tail.synthetic_transfer_task("novel", args, pretrain, runtime.Dist(), _PixelFeatures(),
                                             dino_tail.probe_transform(args))
    names = classes.imagenet_classnames()
    drawn = dino_tail.novel_probe_classes(args.data_seed, 300)
    assert len(set(drawn)) == 300 and drawn == sorted(drawn) and 0 <= drawn[0] and drawn[-1] < 1000
    expected = [names[c] for c in drawn if c not in seen]
    assert task["classnames"] == expected and 0 < len(expected) < 300 - 20


def re_escape(text):
    import re
    return re.escape(text)


def test_bad_flag_exits_2_with_one_line(tmp_path):
    result = _run(["--voc", "100", "--prototypes", "64", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path)])
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dino_tail.py: error: ")]
    assert errors == ["dino_tail.py: error: --voc 100 is larger than the 64 prototypes"], result.stderr
    assert "Traceback" not in result.stderr  # (torch may log an unrelated warning line too)
    unknown = _run(["--bogus", "--out", str(tmp_path / "run")])  # argparse's own errors: one line too
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines()[-1] == \
        "dino_tail.py: error: unrecognized arguments: --bogus" and "usage:" not in unknown.stderr


def _tensors(state):
    out = {}
    for key in ("student", "teacher"):
        out.update({f"{key}.{k}": v for k, v in state[key].items()})
    out["center"] = state["center"]
    return out


def test_resume_is_exact_after_sigkill(tmp_path):
    cache = str(tmp_path / "cache")
    common = TINY + ["--epochs", "4", "--voc", "16", "--cache-dir", cache]
    full = _run(common + ["--out", str(tmp_path / "full")], timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "dino_tail.py"] + common + ["--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint.pt"
    deadline = time.time() + 600
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(checkpoint, weights_only=False)
    assert 1 <= saved["epoch"] < 4, "the kill must land before the run finished"
    resumed = _run(common + ["--out", str(out), "--resume"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {out} at epoch" in resumed.stdout

    a = _tensors(torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False))
    b = _tensors(torch.load(checkpoint, weights_only=False))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in logs] == [0, 1, 2, 3]
    fa = json.load(open(tmp_path / "full" / "final.json"))
    fb = json.load(open(out / "final.json"))
    assert fa["utilisation"] == fb["utilisation"]


def test_random_backbone_and_no_photometric_augmentation(tmp_path):
    """--epochs 0 probes a randomly initialised backbone (no step taken); --photometric none leaves the crops
    as they are (CLIP normalisation only); final.json has the last epoch's loss."""
    cache = str(tmp_path / "cache")
    random_run = _run(TINY + ["--epochs", "0", "--cache-dir", cache, "--out", str(tmp_path / "random")], timeout=600)
    assert random_run.returncode == 0, random_run.stderr[-2000:]
    final = json.load(open(tmp_path / "random" / "final.json"))
    assert final["epochs"] == 0 and final["final_loss"] is None and not (tmp_path / "random" / "checkpoint.pt").exists()
    trained = _run(TINY + ["--epochs", "1", "--photometric", "none", "--cache-dir", cache, "--out", str(tmp_path / "t")],
                   timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "t" / "log.jsonl")]
    assert json.load(open(tmp_path / "t" / "final.json"))["final_loss"] == pytest.approx(log[-1]["loss"])
    assert dino_tail.parse_args([]).photometric == "none" and dino_tail.parse_args(["--recipe", "paper"]).photometric == "dino"
    x = torch.rand(4, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (sources.CLIP_MEAN, sources.CLIP_STD))
    torch.testing.assert_close(dino_tail.photometric_augment(x, torch.zeros(4, dino_tail.PHOTO_PARAMS)), (x - mean) / std)
    torch.testing.assert_close(dino_tail.clip_normalise(x), (x - mean) / std)  # what --photometric none runs


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo processes and the same global batch trains the same model as 1 process (up to
    reduction order), with identical prototype draws (the run would diverge otherwise)."""
    cache = str(tmp_path / "cache")
    common = TINY + ["--epochs", "2", "--voc", "16", "--cache-dir", cache]
    one = _run(common + ["--out", str(tmp_path / "one")], timeout=900)
    assert one.returncode == 0, one.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "dino_tail.py"] + common + ["--out", str(tmp_path / "two")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-2000:]
    a = _tensors(torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False))
    b = _tensors(torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False))
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


# ---- Caltech101 / SUN397 split files (ssl-transfer's protocol, Table 2) ------------------------------------

def _jpg(path, value):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("L", (8, 8), value).save(path)  # greyscale, as some Caltech101 images are


def _tensor_of(image):
    return T.functional.pil_to_tensor(image)


def test_caltech101_split_files_are_followed(tmp_path):
    where = tmp_path / "caltech101"
    images = where / "caltech101" / "101_ObjectCategories"
    files = {"BACKGROUND_Google/image_0001.jpg": (0, 10), "Faces/image_0001.jpg": (1, 20),
             "Faces/image_0002.jpg": (1, 30), "ant/image_0001.jpg": (2, 40), "ant/image_0002.jpg": (2, 50)}
    for rel, (_, value) in files.items():
        _jpg(images / rel, value)
    _jpg(images / "ant" / "image_0003.jpg", 60)  # in neither split: left out
    (where / "caltech101-splits").mkdir()
    train = ["BACKGROUND_Google/image_0001.jpg", "Faces/image_0001.jpg", "ant/image_0002.jpg"]
    test = ["Faces/image_0002.jpg", "ant/image_0001.jpg"]
    for split, rels in (("train", train), ("test", test)):
        (where / "caltech101-splits" / f"{split}.txt").write_text("".join(f"{r} {files[r][0]}\n" for r in rels))
    tr, val, te = sources.transfer_splits("caltech101", str(tmp_path), _tensor_of)
    assert val is None and len(tr) == 3 and len(te) == 2 and tr.classes == ["BACKGROUND_Google", "Faces", "ant"]
    for dataset, rels in ((tr, train), (te, test)):
        for (image, label), rel in zip(dataset, rels):
            assert image.shape == (3, 8, 8) and int(image[0, 0, 0]) == files[rel][1] and label == files[rel][0]
    # ssl-transfer's readme places the two files beside the images: found there too
    for split in ("train", "test"):
        (where / "caltech101-splits" / f"{split}.txt").rename(where / f"{split}.txt")
    assert len(sources.transfer_splits("caltech101", str(tmp_path), _tensor_of)[0]) == 3
    for split in ("train", "test"):
        (where / f"{split}.txt").rename(where / "caltech101-splits" / f"{split}.txt")
    # a test file whose labels disagree with the training file's folders
    (where / "caltech101-splits" / "test.txt").write_text("Faces/image_0002.jpg 2\n")
    with pytest.raises(ValueError, match="disagree with the training file's labels"):
        sources.transfer_splits("caltech101", str(tmp_path), _tensor_of)
    (where / "caltech101-splits" / "test.txt").write_text("Faces/image_0002.jpg\n")
    with pytest.raises(ValueError, match=r"test.txt, line 1: expected 'Class/image.jpg LABEL'"):
        sources.transfer_splits("caltech101", str(tmp_path), _tensor_of)
    (where / "caltech101-splits" / "test.txt").write_text("Faces/image_0009.jpg 1\n")
    with pytest.raises(FileNotFoundError, match="1 listed images are not under .*Faces/image_0009.jpg"):
        sources.transfer_splits("caltech101", str(tmp_path), _tensor_of)
    # checked before pre-training starts, like the folders
    for k, wnid in enumerate(("n01440764", "n01443537")):  # a two-class pre-training ImageFolder
        _jpg(tmp_path / "pretrain" / "train" / wnid / "x.jpg", 100 + k)
    run = subprocess.run([sys.executable, os.path.join(REPO, "dino_tail.py"), "--data", "imagefolder",
                          "--data-root", str(tmp_path / "pretrain"), "--transfer", "caltech101",
                          "--transfer-root", str(tmp_path), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode != 0 and "Faces/image_0009.jpg" in run.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_birdsnap_release_layout_is_read_as_ssl_transfer_does(tmp_path):
    where = tmp_path / "birdsnap"
    images = where / "download" / "images"
    values = {"Acadian_Flycatcher/1.jpg": 10, "Acadian_Flycatcher/2.jpg": 20, "Acadian_Flycatcher/3.jpg": 30,
              "Zone-tailed_Hawk/7.jpg": 40, "Zone-tailed_Hawk/8.jpg": 50}
    with pytest.raises(FileNotFoundError, match="no folder .*birdsnap"):
        sources.check_transfer_folders(["birdsnap"], str(tmp_path))
    where.mkdir()
    with pytest.raises(FileNotFoundError, match="no file .*test_images.txt"):  # checked before pre-training
        sources.check_transfer_folders(["birdsnap"], str(tmp_path))
    for rel, value in values.items():
        _jpg(images / rel, value)
    # the release's header line, a listed image that was never downloaded (left out, with a warning)
    (where / "test_images.txt").write_text("path\nAcadian_Flycatcher/2.jpg\nZone-tailed_Hawk/8.jpg\n"
                                           "Zone-tailed_Hawk/9.jpg\n")
    sources.check_transfer_folders(["birdsnap"], str(tmp_path))
    with pytest.warns(UserWarning, match="1 of the 3 listed test images are not under"):
        tr, val, te = sources.transfer_splits("birdsnap", str(tmp_path), _tensor_of)
    assert val is None and tr.dataset.classes == ["Acadian_Flycatcher", "Zone-tailed_Hawk"]
    assert sorted((int(x[0, 0, 0]), y) for x, y in tr) == [(10, 0), (30, 0), (40, 1)]
    assert sorted((int(x[0, 0, 0]), y) for x, y in te) == [(20, 0), (50, 1)]
    (where / "test_images.txt").write_text("path\nNo_Such_Bird/1.jpg\n")
    with pytest.raises(ValueError, match="none of its 1 test images is under"):
        sources.transfer_splits("birdsnap", str(tmp_path), _tensor_of)


def test_sun397_official_partition_and_fallback(tmp_path):
    root = tmp_path / "sun397" / "SUN397"
    rels = {"a/abbey/sun_a1.jpg": 10, "a/abbey/sun_a2.jpg": 20, "b/bakery/shop/sun_b1.jpg": 30,
            "b/bakery/shop/sun_b2.jpg": 40}
    for rel, value in rels.items():
        _jpg(root / rel, value)
    (root / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    # without partition files: torchvision's SUN397, a seeded 80/20 split, and a warning before pre-training
    args = type("Args", (), dict(transfer_root=str(tmp_path)))()
    with pytest.warns(UserWarning, match="no split files .* not comparable with Table 2"):
        sources.check_transfer_folders(["sun397"], args.transfer_root)
    tr, _, te = sources.transfer_splits("sun397", str(tmp_path), _tensor_of)
    assert len(tr) + len(te) == 4
    (tmp_path / "sun397" / "Training_01.txt").write_text("/b/bakery/shop/sun_b1.jpg\n/a/abbey/sun_a1.jpg\n")
    (tmp_path / "sun397" / "Testing_01.txt").write_text("/a/abbey/sun_a2.jpg\n/b/bakery/shop/sun_b2.jpg\n")
    tr, _, te = sources.transfer_splits("sun397", str(tmp_path), _tensor_of)
    assert tr.classes == ["abbey", "bakery/shop"]
    assert [(int(x[0, 0, 0]), y) for x, y in tr] == [(30, 1), (10, 0)]
    assert [(int(x[0, 0, 0]), y) for x, y in te] == [(20, 0), (40, 1)]
    (tmp_path / "sun397" / "Testing_01.txt").write_text("/c/canyon/sun_c1.jpg\n")
    with pytest.raises(ValueError, match=r"classes \['canyon'\] are not in the training split"):
        sources.transfer_splits("sun397", str(tmp_path), _tensor_of)
