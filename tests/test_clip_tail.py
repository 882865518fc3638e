"""Tests of clip_tail.py (issue 7): the contrastive loss against a plain reference (one process, two gloo
processes with gathered negatives, --local-loss), the zero-shot classifier against a hand computation,
and whole runs on a tiny synthetic world with the smallest registered model (RN-micro): 1 vs 2 processes,
kill-and-resume, open_clip loading the checkpoint, the exported head read back by classes.load_head (and
sl_tail.py when present), text-tower init/freeze, evaluation only, and clear errors."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import scipy.special
import scipy.stats
import torch
import torch.multiprocessing as mp

import clip_tail
import classes
import data
import runtime
import world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "clip_tail.py")
EPOCHS = 3


# ---------------------------------------------------------------------------------------------------
# The contrastive loss (Sec. 3.3) against a straightforward reference
# ---------------------------------------------------------------------------------------------------

def reference_clip_loss(image, text, scale):
    """Symmetric cross-entropy over explicit logits, in float64 numpy/scipy (no torch involved)."""
    logits = scale * image @ text.T
    n = logits.shape[0]
    image_to_text = -(np.diag(logits) - scipy.special.logsumexp(logits, axis=1)).mean()
    text_to_image = -(np.diag(logits) - scipy.special.logsumexp(logits, axis=0)).mean()
    return (image_to_text + text_to_image) / 2 if n else 0.0


def reference_clip_grads(image, text, scale):
    """Gradients of the reference loss w.r.t. image, text features and the scale, by plain autograd on an
    explicit torch formula (log_softmax rows and columns)."""
    image, text, scale = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (image, text, scale))
    logits = scale * image @ text.T
    diag = torch.arange(len(logits))
    loss = -(logits.log_softmax(1)[diag, diag].mean() + logits.log_softmax(0)[diag, diag].mean()) / 2
    loss.backward()
    return image.grad.numpy(), text.grad.numpy(), scale.grad.item()


def random_batch(n=8, dim=16, seed=0):
    g = np.random.default_rng(seed)
    image = g.normal(size=(n, dim))
    text = g.normal(size=(n, dim))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image, text, 7.5


def clip_loss_and_grads(loss_fn, image, text, scale):
    image, text, scale = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (image, text, scale))
    loss = loss_fn(image, text, scale)
    loss.backward()
    return loss.item(), image.grad.numpy(), text.grad.numpy(), scale.grad.item()


def test_contrastive_loss_one_process_matches_reference():
    image, text, scale = random_batch()
    loss, g_image, g_text, g_scale = clip_loss_and_grads(clip_tail.contrastive_loss(runtime.Dist()), image, text, scale)
    assert loss == pytest.approx(reference_clip_loss(image, text, scale), rel=1e-12)
    ref = reference_clip_grads(image, text, scale)
    np.testing.assert_allclose(g_image, ref[0], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(g_text, ref[1], rtol=1e-10, atol=1e-14)
    assert g_scale == pytest.approx(ref[2], rel=1e-10)


def _loss_worker(rank, world_size, port, local_loss, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = runtime.init_distributed("cpu")
    image, text, scale = random_batch()
    rows = slice(rank * len(image) // world_size, (rank + 1) * len(image) // world_size)
    result = clip_loss_and_grads(clip_tail.contrastive_loss(dist, local_loss), image[rows], text[rows], scale)
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.array(result, dtype=object), allow_pickle=True)
    runtime.close_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("local_loss", [False, True], ids=["gathered", "local"])
def test_contrastive_loss_two_processes(tmp_path, local_loss):
    # fork: the workers need no fresh interpreter (no CUDA here, gloo only)
    mp.start_processes(_loss_worker, args=(2, _free_port(), local_loss, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [np.load(tmp_path / f"rank{r}.npy", allow_pickle=True) for r in range(2)]
    image, text, scale = random_batch()
    if not local_loss:
        # Gathered negatives: the ranks' losses average to the global-batch loss, and DDP's gradient
        # average (sum over ranks / 2) of the features' and scale's gradients is the one-process gradient.
        assert np.mean([r[0] for r in ranks]) == pytest.approx(reference_clip_loss(image, text, scale), rel=1e-12)
        ref = reference_clip_grads(image, text, scale)
        np.testing.assert_allclose(np.concatenate([r[1] for r in ranks]) / 2, ref[0], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(np.concatenate([r[2] for r in ranks]) / 2, ref[1], rtol=1e-10, atol=1e-14)
        assert np.mean([r[3] for r in ranks]) == pytest.approx(ref[2], rel=1e-10)
    else:
        # Negatives not shared (Sec. 3.3): each rank's loss is the reference loss of its own half-batch.
        for rank, r in enumerate(ranks):
            rows = slice(rank * 4, rank * 4 + 4)
            assert r[0] == pytest.approx(reference_clip_loss(image[rows], text[rows], scale), rel=1e-12)
            ref = reference_clip_grads(image[rows], text[rows], scale)
            np.testing.assert_allclose(r[1], ref[0], rtol=1e-10, atol=1e-14)
        assert ranks[0][0] != pytest.approx(reference_clip_loss(image, text, scale), rel=1e-3)


def test_count_batch_classes():
    labels = torch.tensor([3, 3, -1, 5, 0, 0, -1, 9])
    assert clip_tail.count_batch_classes(labels) == len({3, 5, 0, 9})
    assert clip_tail.count_batch_classes(torch.tensor([-1, -1])) == 0


# ---------------------------------------------------------------------------------------------------
# Zero-shot classifier (Appx. C.6) against a hand computation
# ---------------------------------------------------------------------------------------------------

def test_zero_shot_classifier_matches_hand_computation():
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("RN-micro")
    tokenizer = open_clip.get_tokenizer("RN-micro")
    classnames = ["goldfish", "tabby cat", "volcano"]
    templates = [lambda c: f"a photo of a {c}.", lambda c: f"a drawing of the {c}.", lambda c: f"itap of my {c}."]
    got = clip_tail.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu")
    with torch.no_grad():
        hand = []
        for name in classnames:
            embeddings = [model.encode_text(tokenizer([t(name)]))[0] for t in templates]
            mean = torch.stack([e / e.norm() for e in embeddings]).mean(0)
            hand.append(mean / mean.norm())
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, torch.stack(hand), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Whole runs on a tiny world
# ---------------------------------------------------------------------------------------------------

def tiny_flags(cache_dir):
    return ["--model", "RN-micro", "--classes", "rand10", "--num-train", "640", "--num-test-per-class", "4",
            "--batch-size", "64", "--warmup", "5", "--lr", "2e-3", "--captions", "template",
            "--cache-dir", str(cache_dir)]


def run_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CLIP_TAIL_DEBUG", None)
    return env


def run_script(args, *, prefix=(sys.executable,), check=True):
    proc = subprocess.run([*prefix, SCRIPT, *args], cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"clip_tail.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_final(out):
    with open(os.path.join(out, "final.json")) as f:
        return json.load(f)


def read_eval(out):
    with np.load(os.path.join(out, "eval.npz")) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("world")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, world_cache):
    """One process, uninterrupted, 3 epochs, with the text classifier exported."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    run_script([*tiny_flags(world_cache), "--epochs", str(EPOCHS), "--out", str(out),
                "--export-head", str(out / "head.pt")])
    return out


def load_tiny_data(world_cache):
    import argparse
    parser = data.add_data_args(argparse.ArgumentParser())
    return data.load_data(parser.parse_known_args(tiny_flags(world_cache))[0])


def test_run_outputs(reference_run, world_cache):
    for name in ("args.json", "log.jsonl", "final.json", "per_class.csv", "eval.npz", "checkpoint.pt"):
        assert (reference_run / name).is_file(), name
    final, log = read_final(reference_run), read_log(reference_run)
    for key in ("top1", "corr_acc", "corr_pred", "nc1", "nc2_m", "nc2_w", "batch_classes_mean"):
        assert key in final
    assert [r["epoch"] for r in log] == list(range(EPOCHS))
    assert all(np.isfinite(r["loss"]) for r in log) and log[-1]["loss"] < log[0]["loss"]
    # batch_classes_mean: distinct classes per global batch, recounted here with Python sets over the same
    # global batches (runtime.GlobalBatchSampler, one process) and the training labels.
    world = load_tiny_data(world_cache)
    counts = []
    for epoch in range(EPOCHS):
        sampler = runtime.GlobalBatchSampler(range(len(world.train)), 64, runtime.Dist(), seed=0, epoch=epoch)
        counts += [len({int(world.train.labels[i]) for i in batch} - {-1}) for batch in sampler]
    assert final["batch_classes_mean"] == pytest.approx(np.mean(counts), rel=1e-9)


def test_two_processes_agree_with_one(world_cache, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) vs one process on the same global batches: gathered negatives,
    BatchNorm over the global batch, sharded evaluation. The learning rate is negligible here because
    Adam's first steps (update ~ lr * sign(g)) turn reduction-order noise in near-zero gradient entries
    into lr-sized differences; the gradients themselves are compared in the loss tests above."""
    flags = [*tiny_flags(world_cache), "--epochs", "1", "--lr", "1e-9"]
    run_script([*flags, "--out", str(tmp_path / "one")])
    run_script([*flags, "--out", str(tmp_path / "two")],
               prefix=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    (one,), (two,) = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["batch_classes"] == one["batch_classes"]
    assert two["logit_scale"] == pytest.approx(one["logit_scale"], rel=1e-6)
    e1, e2 = read_eval(tmp_path / "one"), read_eval(tmp_path / "two")
    np.testing.assert_array_equal(e1["labels"], e2["labels"])
    np.testing.assert_allclose(e2["classifier"], e1["classifier"], atol=1e-5)
    np.testing.assert_allclose(e2["features"].astype(np.float32), e1["features"].astype(np.float32), rtol=2e-3, atol=1e-4)
    np.testing.assert_array_equal(e1["preds"], e2["preds"])


def test_local_loss_counts_each_process_own_classes(world_cache, tmp_path):
    """--local-loss: each process contrasts its own half of the batch, so a step's vocabulary is the mean of
    the two halves' class counts (recounted here from the samplers' shards), not the global batch's."""
    out = tmp_path / "local"
    run_script([*tiny_flags(world_cache), "--epochs", "1", "--local-loss", "--out", str(out)],
               prefix=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    world = load_tiny_data(world_cache)
    shards = [runtime.GlobalBatchSampler(range(len(world.train)), 64, runtime.Dist(rank=r, world_size=2), seed=0)
              for r in range(2)]
    per_step = [np.mean([len({int(world.train.labels[i]) for i in b} - {-1}) for b in batches])
                for batches in zip(*shards)]
    (log,) = read_log(out)
    assert log["batch_classes"] == pytest.approx(np.mean(per_step), rel=1e-9)


def test_kill_and_resume_equals_uninterrupted(reference_run, world_cache, tmp_path):
    out = tmp_path / "killed"
    args = [*tiny_flags(world_cache), "--epochs", str(EPOCHS), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=REPO, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "checkpoint.pt").exists() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "final.json").exists(), "the run finished before it could be killed"
    saved_epoch = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= saved_epoch < EPOCHS
    run_script([*args, "--resume"])
    uninterrupted, resumed = read_log(reference_run), read_log(out)
    assert len(resumed) == len(uninterrupted) == EPOCHS
    for a, b in zip(uninterrupted, resumed):
        assert {**a, "time": 0} == {**b, "time": 0}
    e1, e2 = read_eval(reference_run), read_eval(out)
    for key in ("preds", "labels", "features", "classifier"):
        np.testing.assert_array_equal(e1[key], e2[key])


def test_checkpoint_loads_in_open_clip(reference_run, world_cache):
    import open_clip
    open_clip.add_model_config(clip_tail.MODEL_CONFIGS)
    model, _, _ = open_clip.create_model_and_transforms("RN-micro", pretrained=str(reference_run / "checkpoint.pt"))
    model.eval()
    saved = read_eval(reference_run)
    # open_clip's own zero-shot classifier from the loaded weights = the run's text classifier.
    classifier = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer("RN-micro"),
                                                      [str(n) for n in saved["classnames"]],
                                                      open_clip.OPENAI_IMAGENET_TEMPLATES)
    np.testing.assert_allclose(classifier.T.numpy(), saved["classifier"], rtol=1e-5, atol=1e-6)
    # ... and its image embeddings of the test images = the run's.
    world = load_tiny_data(world_cache)
    images = torch.stack([world.test[i][0] for i in range(16)])
    with torch.no_grad():
        features = model.encode_image(images).numpy()
    np.testing.assert_allclose(features, saved["features"][:16], rtol=1e-5, atol=1e-6)


def test_exported_head_reads_back(reference_run, world_cache):
    saved = read_eval(reference_run)
    world = load_tiny_data(world_cache)
    head = classes.load_head(str(reference_run / "head.pt"), world.imagenet_ids, world.classnames)
    np.testing.assert_allclose(head.numpy(), saved["classifier"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(head.numpy(), axis=1), 1.0, rtol=1e-5)
    # rows are found by class name, whatever the order of the classes in the file
    reversed_names = list(world.classnames)[::-1]
    np.testing.assert_allclose(classes.load_head(str(reference_run / "head.pt"), world.imagenet_ids[::-1],
                                              reversed_names).numpy(), saved["classifier"][::-1], rtol=1e-6)


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "sl_tail.py")), reason="sl_tail.py not in the checkout yet")
def test_exported_head_trains_sl_tail(reference_run, world_cache, tmp_path):
    flags = [f for f in tiny_flags(world_cache) if f not in ("--model", "RN-micro", "--warmup", "5", "--lr", "2e-3")]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "sl_tail.py"), *flags, "--epochs", "1",
                           "--head", "frozen", "--head-file", str(reference_run / "head.pt"), "--out", str(tmp_path / "sl")],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sl" / "final.json").is_file()


def run_in_process(flags, monkeypatch, capsys):
    """clip_tail.py's command line in this process (no interpreter start-up): exit code and stderr."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *flags])
    try:
        runtime.run_cli(lambda: clip_tail.main(flags))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_text_init_from_checkpoint_and_lock(reference_run, world_cache, tmp_path, monkeypatch, capsys):
    """--text-init CKPT --lock-text: the text tower is the reference run's and stays frozen, so the
    zero-shot classifier (a function of the text tower only) equals the reference's after training."""
    out = tmp_path / "frozen"
    code, err = run_in_process([*tiny_flags(world_cache), "--epochs", "1", "--out", str(out),
                                "--text-init", str(reference_run / "checkpoint.pt"), "--lock-text"], monkeypatch, capsys)
    assert code == 0, err
    np.testing.assert_allclose(read_eval(out)["classifier"], read_eval(reference_run)["classifier"], rtol=1e-6, atol=1e-7)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    reference = torch.load(reference_run / "checkpoint.pt", weights_only=True)
    text_keys = [k for k in state["state_dict"] if clip_tail.is_text_key(k)]
    assert text_keys and all(torch.equal(state["state_dict"][k], reference["state_dict"][k]) for k in text_keys)
    assert any(not torch.equal(v, reference["state_dict"][k]) for k, v in state["state_dict"].items()
               if k.startswith("visual."))  # while the image tower trained


def test_text_targets_are_the_heads_principal_components():
    """The distillation targets: CLIP RN50's class embeddings, centred, on their top principal components,
    unit norm -- checked against numpy's SVD; cosines between classes keep the head's order roughly."""
    head = classes.load_head("clip-rn50", range(1000)).double().numpy()
    centred = head - head.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:32].T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = clip_tail.text_targets("clip-rn50", 32).double().numpy()
    signs = np.sign((got * expected).sum(0))  # a principal direction is defined up to its sign
    np.testing.assert_allclose(got * signs, expected, atol=1e-4)
    full = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    a, b = (full @ full.T)[np.triu_indices(1000, 1)], (got @ got.T)[np.triu_indices(1000, 1)]
    assert scipy.stats.spearmanr(a, b)[0] > 0.8


def test_distilled_text_tower_knows_every_class(world_cache, tmp_path, monkeypatch, capsys):
    """--distill-text: the text tower alone learns to map captions of any of the 1,000 ImageNet classes onto
    their targets (far above the 0.1 % of chance), then stays frozen under --lock-text while the image tower
    trains; a resumed run keeps its distillation result."""
    out = tmp_path / "distilled"
    flags = [*tiny_flags(world_cache), "--epochs", "1", "--out", str(out), "--distill-text", "clip-rn50",
             "--distill-steps", "60", "--batch-size", "128", "--lr", "5e-3", "--lock-text"]
    code, err = run_in_process(flags, monkeypatch, capsys)
    assert code == 0, err
    final = json.loads((out / "final.json").read_text())
    assert final["distill_top1"] > 0.05, final
    model = open_clip.create_model("RN-micro", force_image_size=32)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    model.load_state_dict(state["state_dict"])
    captions, labels = world.caption_corpus(123, 512)
    targets = clip_tail.text_targets("clip-rn50", model.text_projection.shape[1])
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer("RN-micro")(captions), normalize=True)
    assert ((text @ targets.T).argmax(1).numpy() == labels).mean() > 0.05  # on captions it never saw
    assert state["distilled"] == {k: final[k] for k in ("distill_loss", "distill_top1")}


def test_caption_corpus_covers_every_class_and_names_it():
    captions, labels = world.caption_corpus(0, 6000)
    assert len(captions) == 6000 and len(np.unique(labels)) > 990   # all 1,000 classes, uniformly
    synonyms = classes.imagenet_synonyms()
    named = [any(s.lower() in c.lower() for s in synonyms[y]) for c, y in zip(captions, labels)]
    assert np.mean(named) > 0.98


def test_eval_only_on_own_checkpoint(reference_run, world_cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    code, err = run_in_process([*tiny_flags(world_cache), "--eval-only", "--checkpoint",
                                str(reference_run / "checkpoint.pt"), "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    got, ref = read_eval(out), read_eval(reference_run)
    np.testing.assert_allclose(got["features"].astype(np.float32), ref["features"].astype(np.float32), rtol=1e-3, atol=1e-3)
    assert (got["preds"] == ref["preds"]).mean() >= 0.95
    assert read_final(out)["epochs_trained"] == EPOCHS
    assert "warning: --" not in err
    # other data flags than the training run's: evaluated as asked, and said
    code, err = run_in_process([*tiny_flags(world_cache), "--num-test-per-class", "3", "--eval-only", "--checkpoint",
                                str(reference_run / "checkpoint.pt"), "--out", str(tmp_path / "eval3")], monkeypatch, capsys)
    assert code == 0 and "warning: --num-test-per-class is 3 now but was 4 in" in err, err


def test_eval_only_pretrained_on_the_synthetic_world(reference_run, world_cache, tmp_path, monkeypatch, capsys):
    """--pretrained weights evaluated on the synthetic world (uint8 tensor images through open_clip's PIL
    transform): the same predictions as the training run's own evaluation of those weights."""
    out = tmp_path / "pre-synthetic"
    spec = f"RN-micro:{reference_run / 'checkpoint.pt'}"
    code, err = run_in_process([*tiny_flags(world_cache), "--eval-only", "--pretrained", spec, "--out", str(out)],
                               monkeypatch, capsys)
    assert code == 0, err
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    got, ref = read_eval(run_dir), read_eval(reference_run)
    assert got["labels"].tolist() == ref["labels"].tolist() and (got["preds"] == ref["preds"]).mean() >= 0.95


def test_eval_only_without_weights_fails_clearly(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache: ~/.cache/clip
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_network(*args, **kwargs):
        raise AssertionError("clip_tail.py tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    code, err = run_in_process(["--eval-only", "--model", "RN50", "--pretrained", "openai", "--out", str(tmp_path / "out")],
                               monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip_tail.py: error:"), err
    for word in ("RN50", "openai", "download", str(tmp_path / "hf"), os.path.join(str(tmp_path), ".cache", "clip")):
        assert word in lines[0]
    assert not (tmp_path / "out" / "results.csv").exists()


def test_eval_only_pretrained_on_val_folder(reference_run, tmp_path, monkeypatch, capsys):
    """Fig. 1b's path: --eval-only --pretrained MODEL:WEIGHTS:FREQ on an ImageNet-style --val-root (wnid
    folders) with no training set; a weight file stands in for a downloaded tag."""
    from PIL import Image
    ids = classes.imagenet100_ids()[:3]
    rng = np.random.default_rng(0)
    for iid in ids:
        folder = tmp_path / "val" / classes.imagenet_wnids()[iid]
        folder.mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    out = tmp_path / "pre"
    spec = f"RN-micro:{reference_run / 'checkpoint.pt'}:incaps"
    code, err = run_in_process(["--eval-only", "--pretrained", spec, "--val-root", str(tmp_path / "val"),
                                "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 1 and rows[0]["model"] == "RN-micro" and rows[0]["freq_table"] == "incaps"
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    saved = read_eval(run_dir)
    assert saved["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    # all 100 classes (--classes in100) are evaluated, against the IN-Caps-100 profile (read here directly)
    table = os.path.join(REPO, "metadata", "freqs", "class_frequency_incaps_imagenet100_ori.txt")
    counts = [float(line.split("\t")[1]) for line in open(table) if line.strip()]
    np.testing.assert_allclose(saved["train_counts"], counts)
    assert rows[0]["top1"] == pytest.approx(float((saved["preds"] == saved["labels"]).mean()))


def test_pretrained_test_transform_keeps_the_aspect_ratio(tmp_path):
    """A ViT's image_size is (h, w): the test transform must still resize the shorter side and crop the
    centre (CLIP's preprocessing), not squash the image to a square."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    config = dict(embed_dim=16, vision_cfg=dict(image_size=64, layers=1, width=64, patch_size=32),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    (tmp_path / "ViT-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "ViT-test.json"))
    weights = tmp_path / "vit.pt"
    torch.save(open_clip.create_model("ViT-test").state_dict(), weights)
    model, transform = clip_tail.pretrained_model("ViT-test", str(weights), "cpu")
    assert tuple(model.visual.image_size) == (64, 64)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    by_hand = TF.center_crop(TF.resize(image, 64, interpolation=TF.InterpolationMode.BICUBIC), 64)
    by_hand = TF.normalize(TF.to_tensor(by_hand), open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(transform(image), by_hand, atol=1e-5, rtol=0)


def test_cached_pretrained_tag_is_found_offline(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--timm--resnet50_clip.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"stand-in")
    assert clip_tail.cached_pretrained_file("RN50", "openai") == str(weights)
    with pytest.raises(ValueError, match="no_such_tag"):
        clip_tail.cached_pretrained_file("RN50", "no_such_tag")


def test_nan_loss_stops_with_one_line(world_cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    code, err = run_in_process([*tiny_flags(world_cache), "--epochs", "1", "--lr", "1e30", "--warmup", "0",
                                "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1].split("\r")[-1]  # after tqdm's progress bar
    assert last.startswith("clip_tail.py: error: loss became") and "epoch 0 step" in last, err
    assert not (out / "final.json").exists()


@pytest.mark.parametrize("flags, words", [
    (["--lock-text"], ["--lock-text", "--text-init"]),
    (["--distill-text", "nosuch"], ["head not found"]),
    (["--distill-text", "clip-rn50", "--distill-steps", "0"], ["--distill-steps must be >= 1"]),
    (["--distill-text", "clip-rn50", "--text-init", "RN50:openai"], ["--text-init or --distill-text, not both"]),
    (["--pretrained", "openai"], ["--eval-only"]),
    (["--eval-only"], ["--pretrained", "--checkpoint"]),
    (["--text-init", "RN-micro:no_such_tag"], ["no_such_tag"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--model", "NoSuchNet"], ["--model", "'NoSuchNet' is not an open_clip model"]),
    (["--eval-only", "--pretrained", "NoSuchNet:openai"], ["--pretrained NoSuchNet:openai", "not an open_clip model"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    # checked before training, not after it
    (["--freq-table", "nosuch"], ["unknown frequency profile 'nosuch'"]),
    (["--eval-only", "--pretrained", "RN50:openai:nosuch"], ["unknown frequency profile 'nosuch'"]),
    (["--text-init", "runs/none/checkpoint.pt"], ["--text-init runs/none/checkpoint.pt: no such file"]),
    (["--open-world", "-3"], ["--open-world"]),
    (["--text-init", "RN-micro:/nonexistent/w.pt"], ["--text-init RN-micro:/nonexistent/w.pt: no such file"]),
    (["--freq-table", "/nonexistent/freq.txt"], ["frequency table not found: /nonexistent/freq.txt"]),
    (["--lr", "nan"], ["--lr must be a finite number"]),
    (["--amp", "--device", "cpu"], ["--amp needs a CUDA GPU"]),
    (["--batch-size", "1"], ["fewer than 2 images per process"]),
    (["--text-init", "README.md"], ["--text-init README.md: cannot read its weights"]),
    (["--image-size", "7"], ["--image-size must be >= 32"]),
    (["--export-head", "README.md/head.pt"], ["README.md is a file, not a folder"]),
    (["--freq-table", "tests/conftest.py.txt"], ["frequency table not found"]),
    (["--num-train", "300", "--image-size", "32", "--batch-size", "400"],
     ["--batch-size 400 is larger than the 300 training samples"]),
])
def test_bad_input_is_one_line(flags, words, tmp_path, monkeypatch, capsys):
    code, err = run_in_process(["--model", "RN-micro", *flags, "--out", str(tmp_path / "x")], monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip_tail.py: error:") and all(w in lines[0] for w in words), err
    assert not (tmp_path / "x").exists()  # no run folder is left behind


def test_warmup_as_long_as_the_run_is_warned_about(tmp_path, monkeypatch, capsys):
    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop
    monkeypatch.setattr(clip_tail, "cosine_schedule", stop)  # stop before training: the warning comes first
    flags = tiny_flags(tmp_path / "cache") + ["--epochs", "1", "--warmup", "10", "--out", str(tmp_path / "x")]
    with pytest.raises(Stop):
        clip_tail.main(flags)  # 640 images in batches of 64: 10 steps
    assert "warning: --warmup 10 is not shorter than the run's 10 steps" in capsys.readouterr().err
    with pytest.raises(Stop):
        clip_tail.main(flags[:-4] + ["--epochs", "2", "--warmup", "10", "--out", str(tmp_path / "y")])
    assert "--warmup" not in capsys.readouterr().err


def test_freq_tables_of_the_evaluated_classes_are_accepted_up_front(tmp_path):
    """--freq-table may list one line per evaluated class (e.g. the shipped IN-Caps-100 table)."""
    args = clip_tail.parse_args(["--freq-table", "incaps-imagenet100", "--classes", "in100"])
    assert args.freq_table == "incaps-imagenet100"
    table = tmp_path / "in100.txt"
    table.write_text("".join(f"class {i}\t{i + 1}\n" for i in range(100)))
    clip_tail.parse_args(["--eval-only", "--pretrained", f"RN50:openai:{table}"])


def test_text_init_from_a_model_and_weight_file(tmp_path):
    """--text-init MODEL:FILE: the weights of another model's text tower, read from a file."""
    import open_clip
    path = tmp_path / "w.pt"
    torch.save(open_clip.create_model("RN-micro").state_dict(), path)
    args = clip_tail.parse_args(["--model", "RN-micro", "--text-init", f"RN-micro:{path}"])
    model, _ = clip_tail.build_model(args, torch.device("cpu"))
    reference = open_clip.create_model("RN-micro").state_dict()
    saved = torch.load(path)
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved if clip_tail.is_text_key(k))
    assert not all(torch.equal(model.state_dict()[k], reference[k]) for k in saved if clip_tail.is_text_key(k))


def test_a_finished_run_is_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "checkpoint.pt").write_bytes(b"")
    monkeypatch.setattr(clip_tail, "build_model", lambda *a: pytest.fail("model built before the folder check"))
    code, err = run_in_process(["--model", "RN-micro", "--out", str(tmp_path / "done")], monkeypatch, capsys)
    assert code == 2 and "already holds a run" in err


def test_recipes():
    paper = clip_tail.parse_args(["--recipe", "paper"])
    assert (paper.model, paper.epochs, paper.batch_size, paper.lr, paper.warmup) == ("RN50", 32, 1024, 1e-3, 500)
    override = clip_tail.parse_args(["--recipe", "paper", "--epochs", "3", "--lr", "5e-4"])
    assert (override.epochs, override.lr, override.batch_size) == (3, 5e-4, 1024)
    default = clip_tail.parse_args([])
    assert default.model == "RN-tiny" and default.batch_size == clip_tail.RECIPES["default"]["batch_size"]
