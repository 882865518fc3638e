"""sl_tail.py: the vocabulary sampler (Sec. 3.3) against exact probabilities, label remapping, baseline
losses against plain PyTorch, and whole runs on a tiny synthetic world: 1 vs 2 processes, kill and resume,
NaN stop, trimmed tail outputs, bad flags."""
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image

import classes
import data
import runtime
import sl_tail

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny world: 600 training images of the 100 ImageNet-100 classes, 5 test images per class; 2 steps of
# 300 images per epoch. Few steps on purpose: this small net's training is chaotic (a 1e-7 difference in
# reduction order, e.g. 1 vs 2 threads in one process, grows ~10x per step after ~6 steps: at 32 px the
# last stage is 1x1, and BatchNorm over near-constant channels amplifies), so two runs that differ only in
# the process count agree to float tolerance only over a short run.
BATCH, STEPS = 300, 2
TINY = ["--num-train", "600", "--num-test-per-class", "5", "--image-size", "32", "--batch-size", str(BATCH),
        "--epochs", "2", "--lr", "0.02", "--workers", "0", "--voc-images", "0"]
VOC = ["--voc", "97"]  # a 300-sample batch holds ~90 of the 100 classes: the rest is drawn


def draw(batch, size, weights, seed):
    return sl_tail.sample_vocabulary(torch.as_tensor(batch), size, weights, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs use one thread, as the subprocess runs do (OMP_NUM_THREADS=1): on a shared
    2-core machine, two spinning intra-op threads are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the sampler --------------------------------------------------------------------------------------

def test_vocabulary_holds_batch_reaches_size_never_repeats():
    counts = np.random.default_rng(0).integers(1, 50, size=60)
    weights = sl_tail.vocabulary_weights(counts, "freq")
    rng = np.random.default_rng(1)
    for trial in range(300):
        batch = rng.integers(0, 60, size=rng.integers(1, 30))
        size = int(rng.integers(1, 61))
        idx = draw(batch, size, weights, trial)
        assert idx.dtype == torch.int64
        assert set(batch.tolist()) <= set(idx.tolist())
        assert len(set(idx.tolist())) == len(idx)                          # no class twice
        assert torch.equal(idx, idx.sort().values)                         # sorted, as the op needs
        assert len(idx) == max(size, len(set(batch.tolist())))             # reaches V when it can


def test_batch_with_more_classes_than_size_is_the_vocabulary():
    weights = sl_tail.vocabulary_weights(np.ones(20), "uniform")
    idx = draw([7, 3, 3, 12, 0, 19], 4, weights, 0)
    assert idx.tolist() == [0, 3, 7, 12, 19]


def test_zero_frequency_classes_drawn_only_under_uniform():
    counts = np.array([5, 0, 3, 0, 8, 1, 0, 2])
    seen = {how: set() for how in ("freq", "sqrt", "uniform")}
    for how in seen:
        weights = sl_tail.vocabulary_weights(counts, how)
        for seed in range(200):
            seen[how] |= set(draw([0], 4, weights, seed).tolist())
    assert seen["freq"] == seen["sqrt"] == {0, 2, 4, 5, 7}
    assert seen["uniform"] == set(range(8))
    # freq can only fill with the 4 other seen classes: V=8 is not reachable, the vocabulary stops at 5
    assert draw([0], 8, sl_tail.vocabulary_weights(counts, "freq"), 0).tolist() == [0, 2, 4, 5, 7]


@pytest.mark.parametrize("how", ["freq", "sqrt", "uniform"])
def test_single_fill_follows_requested_distribution(how):
    """One class to fill: it is class c with probability w_c / sum of w over classes not in the batch."""
    counts = np.array([40, 1, 9, 25, 3, 0, 16, 4, 12, 2])
    batch = [0, 3]
    weights = sl_tail.vocabulary_weights(counts, how)
    expected_w = {"freq": counts, "sqrt": np.sqrt(counts), "uniform": np.ones(10)}[how].astype(float)
    expected_w[batch] = 0
    n = 4000
    hits = np.zeros(10)
    for seed in range(n):
        fill = set(draw(batch, 3, weights, seed).tolist()) - set(batch)
        hits[fill.pop()] += 1
    keep = expected_w > 0
    assert hits[~keep].sum() == 0
    expected = expected_w[keep] / expected_w[keep].sum() * n
    assert scipy.stats.chisquare(hits[keep], expected).pvalue > 1e-4
    # the check has power: the same counts are rejected against a different distribution
    wrong = expected_w[keep].copy()
    wrong[np.argmax(wrong)] *= 1.5
    wrong = wrong / wrong.sum() * n
    assert scipy.stats.chisquare(hits[keep], wrong).pvalue < 1e-6


def test_fill_of_two_is_successive_sampling_without_replacement():
    """P(pair {i, j}) = w_i/W * w_j/(W - w_i) + w_j/W * w_i/(W - w_j), enumerated by hand."""
    w = np.array([20.0, 1.0, 3.0, 2.0, 8.0])
    W = w.sum()
    pairs = list(itertools.combinations(range(5), 2))
    prob = np.array([w[i] / W * w[j] / (W - w[i]) + w[j] / W * w[i] / (W - w[j]) for i, j in pairs])
    assert prob.sum() == pytest.approx(1.0)
    weights = torch.as_tensor(np.r_[w, 100.0])              # class 5 is in the batch: never a fill
    n = 5000
    hits = np.zeros(len(pairs))
    for seed in range(n):
        idx = draw([5], 3, weights, seed).tolist()
        hits[pairs.index(tuple(c for c in idx if c != 5))] += 1
    assert scipy.stats.chisquare(hits, prob * n).pvalue > 1e-4
    # inclusion is not proportional to w (a naive 'independent draws' sampler would fail this)
    naive = np.array([w[i] * w[j] for i, j in pairs])
    assert scipy.stats.chisquare(hits, naive / naive.sum() * n).pvalue < 1e-6


def test_generator_is_keyed_by_seed_epoch_step_rank():
    weights = sl_tail.vocabulary_weights(np.arange(1, 101), "freq")

    def voc(*key):
        return sl_tail.sample_vocabulary(torch.tensor([1, 2]), 30, weights, sl_tail.vocabulary_generator(*key))

    assert torch.equal(voc(0, 1, 2, 0), voc(0, 1, 2, 0))
    others = [voc(1, 1, 2, 0), voc(0, 2, 2, 0), voc(0, 1, 3, 0), voc(0, 1, 2, 1)]
    assert all(not torch.equal(voc(0, 1, 2, 0), o) for o in others)


def _vocabulary_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    dist = runtime.Dist(rank=rank, world_size=world_size)
    weights = sl_tail.vocabulary_weights(np.arange(1, 101), "freq")
    result = {}
    for scope in ("global", "local"):
        args = type("Args", (), dict(voc=40, voc_scope=scope, seed=3, voc_images=0))()
        g = torch.Generator().manual_seed(rank)
        result[scope] = []
        for step in range(20):
            labels = torch.randint(0, 100, (8,), generator=g)
            [(rows, idx)] = sl_tail.iteration_vocabularies(labels, args, weights, dist, epoch=1, step=step)
            result[scope].append(dict(labels=labels.tolist(), idx=idx.tolist()))
    torch.distributed.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _buffers_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    dist = runtime.Dist(rank=rank, world_size=world_size)
    args = type("Args", (), dict(embed_dim=64, model="rn-small", head="learned"))()
    torch.manual_seed(0)  # same initial weights on both ranks, as seed_everything gives the script
    raw = runtime.sync_batchnorm(sl_tail.build_model(args, 10, 32, None), dist)
    model = torch.nn.parallel.DistributedDataParallel(raw, broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # different images on each rank
    for _ in range(3):
        features, prototypes, scale = model(torch.randn(6, 3, 32, 32, generator=g))
        loss = (scale * features @ prototypes.T).logsumexp(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({name: b for name, b in raw.named_buffers()}, os.path.join(out_dir, f"buffers{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_buffers_stay_identical_across_ranks_without_broadcast(tmp_path):
    """sl_tail's DDP skips broadcast_buffers: synchronised BatchNorm must leave every rank's running
    statistics (and a frozen head) bit-identical after steps on different data."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_buffers_worker, args=(2, port, str(tmp_path)), nprocs=2)
    b0, b1 = (torch.load(tmp_path / f"buffers{r}.pt") for r in range(2))
    assert b0.keys() == b1.keys() and any("running_mean" in k for k in b0)
    initial = runtime.sync_batchnorm(sl_tail.build_model(type("Args", (), dict(embed_dim=64, model="rn-small",
                                                                               head="learned"))(), 10, 32, None),
                                  runtime.Dist())
    moved = [k for k in b0 if "running_mean" in k and not torch.equal(b0[k], dict(initial.named_buffers())[k])]
    assert moved  # the statistics were updated ...
    for k in b0:
        assert torch.equal(b0[k], b1[k]), k  # ... identically on both ranks


def test_every_rank_gets_the_same_vocabulary_under_global(tmp_path):
    """Two gloo processes with different local labels: under global both hold the vocabulary one process
    would draw from the whole batch; under local each draws from its own labels with its own generator."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_vocabulary_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    weights = sl_tail.vocabulary_weights(np.arange(1, 101), "freq")
    for step, (r0, r1) in enumerate(zip(ranks[0]["global"], ranks[1]["global"])):
        assert r0["idx"] == r1["idx"]
        both = torch.tensor(r0["labels"] + r1["labels"])   # = the one-process global batch
        expected = sl_tail.sample_vocabulary(both, 40, weights, sl_tail.vocabulary_generator(3, 1, step, 0))
        assert r0["idx"] == expected.tolist()
    for r in range(2):
        for step, rec in enumerate(ranks[r]["local"]):
            assert set(rec["labels"]) <= set(rec["idx"])
            expected = sl_tail.sample_vocabulary(torch.tensor(rec["labels"]), 40, weights,
                                                 sl_tail.vocabulary_generator(3, 1, step, r))
            assert rec["idx"] == expected.tolist()
    assert any(a["idx"] != b["idx"] for a, b in zip(ranks[0]["local"], ranks[1]["local"]))


def test_a_vocabulary_per_group_of_images():
    """--voc-images N: one vocabulary per N consecutive images, each holding its group's classes, keyed by the
    group's place in the global batch: rank 1 of 2 (16 images each) draws what one process draws for its
    groups 2 and 3 of the 32-image global batch."""
    weights = sl_tail.vocabulary_weights(np.arange(1, 101), "freq")
    args = type("Args", (), dict(voc=20, voc_scope="global", seed=5, voc_images=8))()
    labels = torch.randint(0, 100, (32,), generator=torch.Generator().manual_seed(0))
    one = sl_tail.iteration_vocabularies(labels, args, weights, runtime.Dist(), epoch=2, step=7)
    assert [(rows.start, rows.stop) for rows, _ in one] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    for k, (rows, idx) in enumerate(one):
        assert set(labels[rows].tolist()) <= set(idx.tolist()) and len(idx) == 20
        assert torch.equal(idx, sl_tail.sample_vocabulary(
            labels[rows], 20, weights, sl_tail.vocabulary_generator(5, 2, 7, k)))
    assert not torch.equal(one[0][1], one[1][1])
    rank1 = sl_tail.iteration_vocabularies(labels[16:], args, weights, runtime.Dist(rank=1, world_size=2), 2, 7)
    assert len(rank1) == 2 and all(torch.equal(a, b) for (_, a), (_, b) in zip(rank1, one[2:]))
    # the loss over equal groups is the mean over the batch of each image's cross-entropy over its group's
    features = torch.nn.functional.normalize(torch.randn(32, 16, dtype=torch.float64), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(100, 16, dtype=torch.float64), dim=1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    per_image = []
    for rows, idx in one:
        logits = scale * features[rows] @ prototypes[idx].T
        target = torch.searchsorted(idx, labels[rows])
        per_image.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
    loss_args = type("Args", (), dict(loss="ce"))()
    loss = sum(sl_tail.vocabulary_loss(features[rows], prototypes, idx, labels[rows], scale, loss_args, None)
               for rows, idx in one) / len(one)
    assert loss.item() == pytest.approx(torch.cat(per_image).mean().item(), rel=1e-9)


def test_voc_images_must_divide_the_batch(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="--voc-images 7 does not divide the 300 images"):
        sl_tail.main([*TINY, "--voc-images", "7", "--out", str(tmp_path / "bad"), "--cache-dir", cache_dir])


# ---- labels, losses, re-sampling ----------------------------------------------------------------------

def test_positions_in_vocabulary():
    idx = torch.tensor([2, 5, 9, 40])
    assert sl_tail.positions_in_vocabulary(torch.tensor([40, 2, 9, 9, 5]), idx).tolist() == [3, 0, 2, 2, 1]
    with pytest.raises(ValueError, match="missing from the vocabulary"):
        sl_tail.positions_in_vocabulary(torch.tensor([2, 6]), idx)
    with pytest.raises(ValueError, match="missing from the vocabulary"):
        sl_tail.positions_in_vocabulary(torch.tensor([41]), idx)


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    w = F.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    idx = torch.tensor([0, 2, 3, 5, 8, 9])
    labels = torch.tensor([3, 9, 0, 3, 5, 2])
    counts = np.array([50, 1, 20, 7, 0, 3, 9, 9, 30, 2])
    return x, w, idx, labels, torch.tensor(12.0, dtype=torch.float64), counts


@pytest.mark.parametrize("loss", ["ce", "balanced-softmax", "logit-adjust", "focal"])
def test_baseline_losses_against_hand_computation(loss):
    x, w, idx, labels, scale, counts = _loss_inputs()
    args = type("Args", (), dict(loss=loss, la_tau=0.5, focal_gamma=2.0))()
    log_prior = sl_tail.log_class_prior(counts).double()
    got = sl_tail.vocabulary_loss(x, w, idx, labels, scale, args, log_prior)
    # independent: per-sample loops over numpy logits
    logits = (scale * x @ w.T).numpy()
    prior = np.maximum(counts, 1) / np.maximum(counts, 1).sum()
    tau = {"balanced-softmax": 1.0, "logit-adjust": 0.5}.get(loss, 0.0)
    total = 0.0
    for b in range(6):
        z = np.array([logits[b, c] + tau * np.log(prior[c]) for c in idx.tolist()])
        t = idx.tolist().index(int(labels[b]))
        log_p = z[t] - scipy.special.logsumexp(z)
        total += -(1 - np.exp(log_p)) ** 2 * log_p if loss == "focal" else -log_p
    assert float(got) == pytest.approx(total / 6, rel=1e-5)


def test_full_vocabulary_equals_plain_cross_entropy():
    x, w, _, labels, scale, counts = _loss_inputs()
    args = type("Args", (), dict(loss="ce"))()
    got = sl_tail.vocabulary_loss(x, w, torch.arange(10), labels, scale, args, None)
    assert float(got) == pytest.approx(float(F.cross_entropy(scale * x @ w.T, labels)), rel=1e-5)


def test_class_balanced_indices():
    labels = np.repeat(np.arange(5), [300, 100, 20, 5, 1])
    a = sl_tail.class_balanced_indices(labels, seed=0, epoch=0)
    assert a == sl_tail.class_balanced_indices(labels, seed=0, epoch=0)      # keyed, no hidden state
    assert a != sl_tail.class_balanced_indices(labels, seed=0, epoch=1)
    assert len(a) == len(labels)
    drawn = labels[a]
    assert scipy.stats.chisquare(np.bincount(drawn, minlength=5)).pvalue > 1e-4   # uniform over classes
    # within a class every sample is reachable: class 2's 20 samples all appear over a few epochs
    seen = set()
    for epoch in range(5):
        idx = np.asarray(sl_tail.class_balanced_indices(labels, 0, epoch))
        seen |= set(idx[labels[idx] == 2].tolist())
    assert seen == set(np.flatnonzero(labels == 2).tolist())


def test_affinity_class_sample():
    counts = np.array([9, 1, 0, 7, 5, 0, 3, 8])
    sample = sl_tail.affinity_class_sample(8, counts, np.array([2, 5]), 6)
    assert sample[:2] == [2, 5] and len(sample) == len(set(sample)) == 6
    assert sl_tail.affinity_class_sample(8, counts, None, 3) == [0, 6, 5]   # most, middle, least frequent


def _model_args(head="learnable"):
    return sl_tail.parse_args(["--head", head] + (["--head-file", "clip-rn50"] if head != "learnable" else []))


@pytest.mark.parametrize("head", ["learnable", "frozen", "finetune"])
def test_head_modes_and_logit_scale(head):
    init = torch.randn(7, 64)
    model = sl_tail.build_model(_model_args(head), 7, 32, None if head == "learnable" else init)
    trained = {name for name, p in model.named_parameters()}
    assert ("prototypes" in trained) == (head != "frozen")
    if head != "learnable":
        assert torch.equal(model.prototypes, init)
    assert model.encoder.attnpool.c_proj.out_features == (1024 if head == "learnable" else 64)
    features, prototypes, scale = model.eval()(torch.randn(3, 3, 32, 32))
    assert features.norm(dim=1).sub(1).abs().max() < 1e-5 and prototypes.norm(dim=1).sub(1).abs().max() < 1e-5
    assert float(scale.detach()) == pytest.approx(1 / 0.07, rel=1e-5)            # CLIP's initial temperature
    with torch.no_grad():
        model.log_logit_scale.fill_(np.log(500.0))
    model.cap_logit_scale()
    scale = model.eval()(torch.randn(2, 3, 32, 32))[2]
    assert float(scale.detach()) == pytest.approx(100.0)                          # capped at 100 ...
    scale.backward()
    assert model.log_logit_scale.grad.item() == pytest.approx(100.0)              # ... and still trainable


class _FixedFeatures(torch.nn.Module):
    """Stands in for the model: features are the images themselves, prototypes the unit axes."""

    def __init__(self):
        super().__init__()
        self.prototypes = torch.eye(3)

    def forward(self, x):
        return x, self.prototypes, torch.tensor(10.0)


def test_evaluation_and_posthoc_adjustment():
    x = torch.tensor([[0.60, 0.55, 0.0], [0.0, 0.2, 0.9], [0.50, 0.52, 0.1]])
    dataset = torch.utils.data.TensorDataset(x, torch.tensor([1, 2, 0]))
    log_prior = sl_tail.log_class_prior(np.array([80, 10, 10]))
    for tau, expected in [(0.0, [0, 2, 1]), (1.0, [1, 2, 1])]:
        args = type("Args", (), dict(eval_batch_size=2, workers=0, amp=False, posthoc_tau=tau))()
        features, preds, labels = sl_tail.evaluate(_FixedFeatures(), dataset, runtime.Dist(), args, log_prior)
        assert preds.tolist() == expected and labels.tolist() == [1, 2, 0] and torch.equal(features, x)


def test_recipes_and_lr_steps():
    paper = sl_tail.parse_args(["--recipe", "paper"])
    assert (paper.model, paper.epochs, paper.batch_size, paper.lr, paper.lr_steps, paper.voc_scope) == \
        ("rn50", 90, 256, 0.1, [30, 50, 70], "local")                   # Appx. C.1, the paper code's vocabularies
    assert (paper.lr_schedule, paper.nesterov, paper.voc_images) == ("cosine", False, 0)  # as train_sup.py runs
    default = sl_tail.parse_args([])
    assert (default.epochs, default.lr_steps, default.voc_scope, default.lr) == (5, [2, 3, 4], "global", 0.1 * 32 / 256)
    assert default.voc_images == 16
    # 1/3, 5/9, 7/9 of 3 epochs round to 1, 2, 2: both later decays happen at epoch 2
    assert sl_tail.parse_args(["--epochs", "3"]).lr_steps == [1, 2, 2]
    schedule = torch.optim.lr_scheduler.MultiStepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                                    milestones=[1, 2, 2], gamma=0.1)
    lrs = []
    for _ in range(3):
        lrs.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([1.0, 0.1, 0.001])


def test_cosine_lr_schedule_in_a_run(tmp_path, cache_dir):
    """--lr-schedule cosine: lr_e = lr / 2 * (1 + cos(pi e / epochs)) at the start of epoch e."""
    out = str(tmp_path / "cosine")
    sl_tail.main([*TINY, "--epochs", "3", "--lr-schedule", "cosine", "--out", out, "--cache-dir", cache_dir])
    want = [0.02 / 2 * (1 + np.cos(np.pi * e / 3)) for e in range(3)]
    assert [r["lr"] for r in _log(out)] == pytest.approx(want)


# ---- whole runs -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("world_cache"))


def _env(debug=True):
    """One thread per process; CLIP_TAIL_DEBUG=1 makes sl_tail.py check that all ranks hold the same vocabulary
    (and run_cli show tracebacks)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CLIP_TAIL_DEBUG="1")
    if not debug:
        env.pop("CLIP_TAIL_DEBUG")
    return env


def _run(args, cache_dir, nproc=1, check=True, debug=True):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + ["sl_tail.py", *args, "--cache-dir", cache_dir], cwd=REPO, env=_env(debug),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _final(out):
    with open(os.path.join(out, "final.json")) as f:
        return json.load(f)


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir):
    out = str(tmp_path_factory.mktemp("runs") / "one")
    _run([*TINY, *VOC, "--out", out], cache_dir)
    return out


def test_run_outputs(reference_run):
    final = _final(reference_run)
    for key in ("top1", "corr_acc", "corr_pred", "nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn", "voc_effective"):
        assert key in final
    assert 97 <= final["voc_effective"] < 100
    log = _log(reference_run)
    assert [r["epoch"] for r in log] == [0, 1]
    assert final["voc_effective"] == pytest.approx(np.mean([r["voc_effective"] for r in log]))
    assert {"loss", "lr", "voc_effective", "logit_scale", "time"} <= set(log[0])
    args = json.load(open(os.path.join(reference_run, "args.json")))
    assert args["voc"] == 97 and args["batch_size"] == BATCH
    per_class = open(os.path.join(reference_run, "per_class.csv")).read().splitlines()
    assert len(per_class) == 101
    aff = np.load(os.path.join(reference_run, "affinity.npz"))
    assert aff["affinity"].shape == (20, 20) and np.allclose(np.diag(aff["affinity"]), 1, atol=1e-5)
    state = torch.load(os.path.join(reference_run, "checkpoint.pt"), weights_only=False)
    assert state["epoch"] == 2 and {"model", "optimizer", "scheduler", "rng"} <= set(state)


def test_two_processes_match_one(reference_run, tmp_path, cache_dir):
    out = str(tmp_path / "two")
    _run([*TINY, *VOC, "--out", out], cache_dir, nproc=2)   # CLIP_TAIL_DEBUG checks equal vocabularies
    one, two = _final(reference_run), _final(out)
    for a, b in zip(_log(reference_run), _log(out)):
        assert a["voc_effective"] == b["voc_effective"]           # the same vocabularies, step by step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)    # unsynced BN or a sum-not-mean: ~1e-2
        assert a["logit_scale"] == pytest.approx(b["logit_scale"], rel=1e-4)
    assert abs(one["top1"] - two["top1"]) <= 1 / one["num_eval"]
    for key in ("corr_acc", "corr_pred"):
        assert one[key] == pytest.approx(two[key], abs=0.02)
    for key in ("nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn", "logit_scale", "voc_effective"):
        assert one[key] == pytest.approx(two[key], rel=1e-3)
    # NC1 = tr(S_W S_B^+) / C goes through the pseudo-inverse of a nearly singular S_B after 4 steps:
    # a 1e-5 change of the features moves it by ~1%; misordered gathers move it by far more
    assert one["nc1"] == pytest.approx(two["nc1"], rel=0.05)


def test_kill_and_resume_equals_uninterrupted(reference_run, tmp_path, cache_dir):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "sl_tail.py", *TINY, *VOC, "--out", out, "--cache-dir", cache_dir]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(out, "checkpoint.pt")) and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not os.path.exists(os.path.join(out, "final.json")), "the run ended before it could be killed"
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["epoch"] == 1
    _run([*TINY, *VOC, "--out", out, "--resume"], cache_dir)
    assert _final(out) == _final(reference_run)
    assert [{k: v for k, v in r.items() if k != "time"} for r in _log(out)] == \
        [{k: v for k, v in r.items() if k != "time"} for r in _log(reference_run)]


def test_resume_on_other_data_is_refused(tmp_path, cache_dir):
    """The checkpoint records the run's classes and training labels: --resume with flags that give other
    data (here another --num-train) stops before training, naming the difference."""
    out = str(tmp_path / "run")
    sl_tail.main([*TINY, "--epochs", "1", "--out", out, "--cache-dir", cache_dir])
    with pytest.raises(ValueError, match=re.escape("its checkpoint was trained on another training set (500 "
                                                   "images now, 600 then)")):
        sl_tail.main([*TINY, "--epochs", "2", "--num-train", "500", "--out", out, "--cache-dir", cache_dir,
                      "--resume"])
    assert len(_log(out)) == 1


def test_nan_loss_stops_naming_the_step_and_keeps_checkpoint(tmp_path, cache_dir, monkeypatch):
    calls = {"n": 0}
    real = sl_tail.vocabulary_loss

    def nan_in_second_epoch(*a, **k):
        loss = real(*a, **k)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > STEPS + 1 else loss   # epoch 1, step 1

    monkeypatch.setattr(sl_tail, "vocabulary_loss", nan_in_second_epoch)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="at epoch 1 step 1"):
        sl_tail.main([*TINY, "--out", out, "--cache-dir", cache_dir])
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["epoch"] == 1
    assert not os.path.exists(os.path.join(out, "final.json"))


def test_frozen_head_on_zero_shot_tail(tmp_path, cache_dir):
    out = str(tmp_path / "frozen")
    # an extra evaluation set in ImageNet-V2's layout (folders named by ImageNet class index): 3 classes
    in100 = classes.imagenet100_ids()
    v2 = tmp_path / "v2"
    for k, imagenet_id in enumerate([in100[0], in100[3], in100[7]]):
        for j in range(k + 1):
            folder = v2 / str(imagenet_id)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((12, 12, 3), 40 * (k + j), dtype=np.uint8)).save(folder / f"{j}.png")
    proc = _run(["--num-train", "600", "--num-test-per-class", "5", "--batch-size", "32", "--epochs", "1",
                 "--head", "frozen", "--head-file", "clip-rn50", "--voc", "10", "--trim-tail", "10", "--tail-shots",
                 "0", "--extra-eval", f"v2={v2}", "--out", out], cache_dir)
    final = _final(out)
    # a 32-image batch holds ~25 classes, more than --voc 10: the run says that --voc could not act
    assert final["voc_effective"] > 11 and "warning: the vocabularies averaged" in proc.stderr
    assert final["top1_tail"] is not None and final["top1_other"] is not None
    extra = np.load(os.path.join(out, "extra-v2", "eval.npz"))
    assert sorted(extra["labels"].tolist()) == [0, 3, 3, 7, 7, 7]
    assert final["top1_v2"] == pytest.approx(np.mean(extra["preds"] == extra["labels"]))
    assert _final(os.path.join(out, "extra-v2"))["num_eval"] == 6
    aff = np.load(os.path.join(out, "affinity.npz"))
    assert aff["is_tail"].sum() == 10 and aff["affinity"].shape == (20, 20)
    # the head stayed the shipped CLIP prototypes: its affinities are those of the file's rows
    lt = data.load_data(sl_tail.parse_args(["--num-train", "600", "--num-test-per-class", "5", "--cache-dir", cache_dir,
                                            "--trim-tail", "10", "--tail-shots", "0"]))
    head = classes.load_head("clip-rn50", lt.imagenet_ids, lt.classnames)
    head = F.normalize(head, dim=1)[aff["classes"]]
    assert np.allclose(aff["affinity"], (head @ head.T).numpy(), atol=1e-5)
    tail = set(np.asarray(lt.tail_classes).tolist())
    assert set(aff["classes"][aff["is_tail"]].tolist()) == tail
    assert all(lt.train_counts[c] == 0 for c in tail)


# ---- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--voc", "101"], "--voc 101 is larger than the 100 classes"),
    (["--voc", "-1"], "--voc must be"),
    (["--head", "frozen"], "needs --head-file"),
    (["--head-file", "clip-rn50"], "--head-file needs --head frozen"),
    (["--head", "frozen", "--head-file", "/nonexistent/head.pt"], "head not found"),
    (["--amp", "--device", "cpu"], "--amp needs a CUDA GPU"),
    (["--momentum", "5"], "--momentum must be in [0, 1)"),
    (["--lr-steps", "1000"], "--lr-steps must be epochs in"),
    (["--lr-steps", "-3"], "--lr-steps must be epochs in"),
    (["--embed-dim", "0"], "--embed-dim must be >= 1"),
    (["--focal-gamma", "-3"], "--focal-gamma"),
    (["--batch-size", "1"], "fewer than 2 images per process"),
    (["--head", "frozen", "--head-file", "README.md"], "cannot read head file README.md"),
    (["--data", "imagefolder", "--data-root", ".", "--classes", "nosuch"], "unknown class set"),
    (["--data", "imagefolder", "--data-root", ".", "--profile", "nosuch"], "unknown frequency profile"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
])
def test_bad_flags(flags, message, tmp_path, cache_dir):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        sl_tail.main([*TINY, "--out", str(tmp_path / "bad"), "--cache-dir", cache_dir, *flags])


def test_head_with_wrong_number_of_classes(tmp_path, cache_dir):
    path = str(tmp_path / "head7.pt")
    torch.save(torch.randn(7, 16), path)
    with pytest.raises(ValueError, match="7 classes"):
        sl_tail.main([*TINY, "--out", str(tmp_path / "bad"), "--cache-dir", cache_dir, "--head", "frozen",
                      "--head-file", path])


def test_batch_not_divisible_by_processes(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(runtime, "init_distributed", lambda device="auto", amp=False: runtime.Dist(rank=0, world_size=7))
    with pytest.raises(ValueError, match=f"--batch-size {BATCH} is not divisible by the 7 processes"):
        sl_tail.main([*TINY, "--out", str(tmp_path / "bad"), "--cache-dir", cache_dir])


def test_bad_flag_is_one_line_exit_2(tmp_path, cache_dir):
    proc = _run([*TINY, "--voc", "500", "--out", str(tmp_path / "bad")], cache_dir, check=False, debug=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    # the last line (torch may log warnings of its own above it, e.g. about CUDA_HOME without a GPU)
    assert proc.stderr.strip().splitlines()[-1] == "sl_tail.py: error: --voc 500 is larger than the 100 classes"
    proc = _run([*TINY, "--lr", "nan", "--out", str(tmp_path / "bad")], cache_dir, check=False, debug=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        "sl_tail.py: error: --lr must be a finite number, got nan"
    (tmp_path / "afile").write_text("")
    proc = _run([*TINY, "--out", str(tmp_path / "afile" / "run")], cache_dir, check=False, debug=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "afile" in proc.stderr.strip().splitlines()[-1]
    proc = _run([*TINY, "--bogus", "--out", str(tmp_path / "bad")], cache_dir, check=False, debug=False)
    assert proc.returncode == 2 and "usage:" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "sl_tail.py: error: unrecognized arguments: --bogus"
