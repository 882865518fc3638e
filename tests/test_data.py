"""The data modules (data.py, world.py, sources.py, classes.py): the synthetic world, captions, variants,
frequency estimation, real loaders, bad input.

Small worlds only (a few hundred to a few thousand 32-px images); every check compares with an
independent computation (scipy, the metadata tables, hand-written cases)."""
import argparse
import json
import os
import re
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

import classes
import data
import sources
import world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def opts(tmp_path, *flags):
    p = data.add_data_args(argparse.ArgumentParser())
    return p.parse_args(["--cache-dir", str(tmp_path / "cache"), *flags])


def small(tmp_path, *flags):
    """A small synthetic world: ImageNet-100 classes, 2000 training images, 5 test images per class."""
    return data.load_data(opts(tmp_path, "--num-train", "2000", "--num-test-per-class", "5", *flags))


def mentions(caption, synonyms):
    text = caption.lower()
    return any(s.lower() in text for s in synonyms)


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_world_and_captions(tmp_path):
    a = small(tmp_path / "a", "--open-world", "3")
    b = small(tmp_path / "b", "--open-world", "3")  # separate cache: rendered again from scratch
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert np.array_equal(a.train.labels, b.train.labels)
    assert a.train.captions(epoch=3) == b.train.captions(epoch=3)
    for i in (0, 7, len(a.train) - 1):  # augmented items too
        xa, ya, ca = a.train[i]
        xb, yb, cb = b.train[i]
        assert torch.equal(xa, xb) and ya == yb and ca == cb
    c = small(tmp_path / "c", "--open-world", "3", "--data-seed", "1")
    assert not torch.equal(a.test.images, c.test.images)
    # the cached file is what a second load returns
    files = os.listdir(tmp_path / "a" / "cache")
    assert len([f for f in files if f.startswith("world-") and f.endswith(".pt")]) == 1
    again = small(tmp_path / "a", "--open-world", "3")
    assert torch.equal(again.train.images, a.train.images)


def test_failed_world_cache_write_warns_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """The cache is an optimisation: a write that fails (disk full, read-only folder) warns, returns the
    rendered world all the same, and leaves neither a half-written cache file nor a temp file behind."""
    args = ["--num-train", "300", "--num-test-per-class", "1"]
    reference = data.load_data(opts(tmp_path / "ok", *args))
    cached = os.listdir(tmp_path / "ok" / "cache")
    umask = os.umask(0)
    os.umask(umask)
    assert len(cached) == 1 and os.stat(tmp_path / "ok" / "cache" / cached[0]).st_mode & 0o777 == 0o666 & ~umask
    real_save = torch.save

    def save_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.warns(UserWarning, match="could not cache the synthetic world.*No space left"):
        world = data.load_data(opts(tmp_path / "full", *args))
    assert torch.equal(world.train.images, reference.train.images)
    assert os.listdir(tmp_path / "full" / "cache") == []
    monkeypatch.undo()
    (tmp_path / "file").write_text("not a folder")  # the cache folder cannot be created
    with pytest.warns(UserWarning, match="could not cache"):
        world = data.load_data(data.add_data_args(argparse.ArgumentParser()).parse_args(
            ["--cache-dir", str(tmp_path / "file" / "cache"), *args]))
    assert torch.equal(world.test.images, reference.test.images)


def test_items_depend_only_on_seed_epoch_index(tmp_path):
    d = small(tmp_path)
    d.train.set_epoch(2)
    direct = [d.train[i] for i in (5, 900, 1700)]
    torch.manual_seed(123)  # the caller's global RNG state must not matter ...
    state = torch.get_rng_state()
    again = [d.train[i] for i in (1700, 900, 5)][::-1]
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    for (x1, y1, c1), (x2, y2, c2) in zip(direct, again):
        assert torch.equal(x1, x2) and y1 == y2 and c1 == c2
    # a DataLoader with worker processes sees the same items
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(d.train, [5, 900, 1700]), batch_size=3,
                                         num_workers=2)
    x, y, c = next(iter(loader))
    assert torch.equal(x, torch.stack([t[0] for t in direct])) and list(c) == [t[2] for t in direct]
    d.train.set_epoch(3)
    assert [d.train[i][2] for i in range(40)] != [t for t in d.train.captions(epoch=2)[:40]]


# ---------------------------------------------------------------- class counts and variants


@pytest.mark.parametrize("profile", ["incaps", "laionet-0.7", "yfcc15m", "laion400m", "metaclip-400m"])
def test_counts_follow_profile(profile):
    ids = classes.imagenet100_ids()
    prof = classes.frequency_profile(profile, ids)
    # independent reading of the metadata table
    fn = "class_frequency_incaps_imagenet100_ori.txt" if profile == "incaps" else classes._profile_files()[profile]
    with open(os.path.join(REPO, "metadata", "freqs", fn)) as f:
        table = np.array([float(line.split("\t")[1]) for line in f])
    assert np.array_equal(prof, table if profile == "incaps" else table[ids])
    counts = world.scale_counts(prof, 10000)
    assert counts.sum() == 10000
    assert np.array_equal(counts == 0, prof == 0)  # genuine zeros stay zero, no other class is empty
    assert spearmanr(counts, prof).statistic >= 0.95


def test_world_counts_and_labels(tmp_path):
    d = small(tmp_path, "--profile", "laionet-0.7")
    prof = classes.frequency_profile("laionet-0.7", d.imagenet_ids)
    assert np.array_equal(np.bincount(d.train.labels, minlength=100), d.train_counts)
    assert spearmanr(d.train_counts, prof).statistic >= 0.95
    assert np.array_equal(np.bincount(d.test.labels), np.full(100, 5))
    names = classes.imagenet_classnames()
    assert d.classnames == [names[i] for i in classes.imagenet100_ids()]


@pytest.mark.parametrize("shots", [0, 1])
def test_trim_tail_exact_counts(tmp_path, shots):
    full = small(tmp_path)
    d = small(tmp_path, "--trim-tail", "20", "--tail-shots", str(shots))
    tail = d.tail_classes
    assert len(tail) == 20
    assert (d.train_counts[tail] == shots).all()
    others = np.setdiff1d(np.arange(100), tail)
    assert np.array_equal(d.train_counts[others], full.train_counts[others])
    assert full.train_counts[tail].max() <= full.train_counts[others].min()  # the least frequent ones
    assert np.array_equal(np.bincount(d.train.labels, minlength=100), d.train_counts)
    names, counts = classes.read_frequency_table(d.freq_table_path)
    assert names == d.classnames and np.array_equal(counts, d.train_counts)


def test_trim_tail_keeps_short_classes_and_reports_the_tail(tmp_path):
    """Tail classes with fewer samples than --tail-shots keep what they have (IN-Caps has a class with none);
    the tail is reported even when the cut removes nothing."""
    full = small(tmp_path, "--profile", "laionet-0.7")
    with pytest.warns(UserWarning, match="fewer samples; they keep all they have"):
        d = small(tmp_path, "--profile", "laionet-0.7", "--trim-tail", "30", "--tail-shots", "1")
    assert (full.train_counts[d.tail_classes] == 0).any()  # some of the 30 least frequent have no sample
    assert np.array_equal(d.train_counts[d.tail_classes], np.minimum(full.train_counts[d.tail_classes], 1))
    zero = small(tmp_path, "--profile", "laionet-0.7", "--trim-tail", "5", "--tail-shots", "0")
    assert (full.train_counts[zero.tail_classes] == 0).all() and len(zero.train) == len(full.train)
    assert len(zero.tail_classes) == 5  # nothing cut, still a tail to report top1_tail on


@pytest.mark.parametrize("text", ["1/0", "abc", "0", "3/2"])
def test_bad_subset_fraction_is_an_argparse_error(text, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        opts(tmp_path, "--subset-frac", text)
    assert stop.value.code == 2 and "--subset-frac" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "0"], "--image-size must be >= 1"),
    (["--diversity", "nan"], "--diversity must be a finite number"),
    (["--diversity", "inf"], "--diversity must be a finite number"),
    (["--max-bad-frac", "-1"], "--max-bad-frac must be in [0, 1]"),
    (["--max-bad-frac", "nan"], "--max-bad-frac must be in [0, 1]"),
    (["--data", "cifar100-lt", "--imbalance", "0.5"], "--imbalance"),
    (["--subset-size", "100", "--subset-frac", "1/2"], "not both"),
    (["--extra-eval", "a=/x", "--extra-eval", "a=/y"], "--extra-eval names must differ"),
    (["--classes", "7"], "unknown class set"),
    (["--classes", "rand1"], "unknown class set"),
    (["--trim-tail", "100"], "--trim-tail must be in [1, 99]"),
    (["--extra-eval", "a=REPO/README.md"], "is not a folder"),
    (["--freq-match", ""], "--freq-match needs a profile name or a table file"),
    (["--freq-match", "laionet-07"], "unknown frequency profile 'laionet-07'"),
    (["--freq-match", "/nonexistent/f.txt"], "frequency table not found: /nonexistent/f.txt"),
])
def test_impossible_data_flags_are_refused(flags, message, tmp_path):
    flags = [f.replace("REPO", REPO) for f in flags]
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        small(tmp_path, *flags)


@pytest.mark.parametrize("table, message", [
    ("a\t0\nb\t0\n", "no class with a positive count"),
    ("a\t3\nb\t-1\n", "finite count >= 0"),
    ("a\t3\nb\tnan\n", "finite count >= 0"),
])
def test_frequency_tables_need_finite_non_negative_counts(table, message, tmp_path):
    path = tmp_path / "freq.txt"
    path.write_text(table)
    with pytest.raises(ValueError, match=re.escape(message)):
        classes.read_frequency_table(str(path))


def test_uniform_subset_and_size_match(tmp_path):
    full = small(tmp_path, "--profile", "laionet-0.7")
    d = small(tmp_path, "--profile", "laionet-0.7", "--subset-frac", "1/8")
    present = full.train_counts > 0
    assert len(d.train) == round(2000 / 8) and (d.train_counts[present] >= 1).all()
    assert set(d.train.indices) <= set(range(2000))
    assert spearmanr(d.train_counts, full.train_counts).statistic > 0.7  # a uniform draw keeps the profile
    s = small(tmp_path, "--profile", "laionet-0.7", "--subset-size", "333")
    assert len(s.train) == 333 and (s.train_counts[present] >= 1).all()
    # a subset item is the same item as in the full set
    x1, y1, c1 = d.train[3]
    x2, y2, c2 = full.train[int(d.train.indices[3])]
    assert torch.equal(x1, x2) and y1 == y2 and c1 == c2


def total_variation(counts, target):
    a, b = np.asarray(counts, float), np.asarray(target, float)
    return 0.5 * np.abs(a / a.sum() - b / b.sum()).sum()


def test_frequency_matched_resampling(tmp_path):
    """The synthetic world (smaller than the target set): the target's shares of the world's own size."""
    d = small(tmp_path, "--profile", "uniform", "--freq-match", "laionet-0.7")
    target = classes.frequency_profile("laionet-0.7", d.imagenet_ids)
    want = np.minimum(np.round(target / target.sum() * 2000), 20)  # 20 images per class in the uniform world
    assert np.array_equal(d.train_counts, want) and (d.train_counts[target == 0] == 0).all()
    assert d.info["freq_match_distance"] == pytest.approx(total_variation(d.train_counts, target))
    assert spearmanr(d.train_counts, target).statistic > 0.9


def test_frequency_match_takes_a_smaller_targets_counts_as_they_are():
    """LAIONet (large) to IN-Caps (smaller), as the authors do: the target's own counts, so no class is
    capped here and the match is exact (scaled up to the source's size, three classes would be capped)."""
    labels = np.repeat(np.arange(4), 100)
    target = np.array([40, 20, 10, 5])
    kept, distance = data.frequency_matched_subset(labels, target, np.random.default_rng(0), target_size=75)
    assert np.bincount(labels[kept], minlength=4).tolist() == [40, 20, 10, 5] and distance == 0
    assert len(set(kept.tolist())) == len(kept)


def test_open_world_samples(tmp_path):
    d = small(tmp_path, "--open-world", "4", "--captions", "template")
    assert len(d.open_world_names) == 4 and not set(d.open_world_names) & set(d.classnames)
    ow = np.flatnonzero(d.train.labels == -1)
    assert len(ow) > 0 and d.train_counts.sum() == 2000
    caps = d.train.captions()
    assert all(any(n in caps[i] for n in d.open_world_names) for i in ow)
    lab = d.train_labelled()
    assert len(lab) == 2000 and (lab.labels >= 0).all()
    assert np.array_equal(d.labelled_indices(), np.flatnonzero(d.train.labels >= 0))


# ---------------------------------------------------------------- captions


def test_template_captions(tmp_path):
    d = small(tmp_path, "--captions", "template")
    templates = classes.caption_templates()
    for i in range(0, 2000, 97):
        y = d.train.labels[i]
        assert d.train[i][2] in {t(d.classnames[y]) for t in templates}
    d = small(tmp_path, "--captions", "template-synset")
    seen_synonym = False
    caps = d.train.captions()
    for i in range(0, 2000, 7):
        y = d.train.labels[i]
        cap = caps[i]
        options = {t(s): s for s in d.synonyms[y] for t in templates}
        assert cap in options
        seen_synonym |= options[cap] != d.classnames[y]
    assert seen_synonym
    p = small(tmp_path, "--captions", "template", "--class-name", "front")
    assert all(c.startswith(d.classnames[y] + " ") for c, y in zip(p.train.captions()[:50], p.train.labels[:50]))


def test_natural_caption_descriptiveness_grows_with_fields(tmp_path):
    """Without the extra class name (--class-name none), more fields mention the class more often: the
    confound the released caption variants remove by naming the class in every caption."""
    fractions = []
    for fields in ["title", "title,description", "title,description,tags"]:
        d = small(tmp_path, "--caption-fields", fields, "--class-name", "none")
        caps = d.train.captions()
        fractions.append(np.mean([mentions(c, d.synonyms[y]) for c, y in zip(caps, d.train.labels)]))
        lengths = np.mean([len(c.split()) for c in caps])
        if fields == "title":
            assert lengths < 6
    assert fractions[0] < fractions[1] < fractions[2], fractions
    assert 0.3 < fractions[0] < 0.6 and fractions[2] > 0.85
    # realistic noise: some captions miss the class, some name another evaluated class
    d = small(tmp_path, "--class-name", "none")
    caps = d.train.captions()
    others = [any(mentions(c, [n]) for k, n in enumerate(d.classnames) if k != y and len(n) > 4)
              for c, y in zip(caps, d.train.labels)]
    assert 0.02 < np.mean(others) < 0.6
    for f in ["description", "tags"]:
        assert small(tmp_path, "--caption-fields", f).train.captions()[0]


def test_class_name_in_every_natural_caption(tmp_path):
    """--class-name: the released caption variants' '{name} {caption}' (front), the synthetic world's default
    '{caption} {name}' (end), or nothing more (none); fields joined as the released code joins them (title,
    tags, description); real data names the class in front by default; templates get no extra name."""
    base = small(tmp_path, "--class-name", "none", "--caption-fields", "title,tags,description").train.captions()
    labels = small(tmp_path).train.labels
    names = small(tmp_path).classnames
    front = small(tmp_path, "--class-name", "front").train.captions()
    end = small(tmp_path).train.captions()
    assert all(f == f"{names[y]} {b}" for f, b, y in zip(front[:200], base, labels))
    assert all(e == f"{b} {names[y]}" for e, b, y in zip(end[:200], base, labels))
    titles = small(tmp_path, "--class-name", "none", "--caption-fields", "title").train.captions()
    assert all(b.startswith(t) for b, t in zip(base[:200], titles))   # the title first, ...
    assert all(b[-1] in ".!" for b in base[:200])                        # ... the description last
    real = argparse.Namespace(caption_fields="title", captions="natural", class_name=None, data="incaps")
    assert sources.caption_options(real)["class_name"] == "front"
    real.data = "tsv"  # one caption per image, used as it is
    assert sources.caption_options(real)["class_name"] == "none"
    real.captions = "template"
    assert sources.caption_options(real)["class_name"] == "none"


def test_bad_caption_fields(tmp_path):
    with pytest.raises(ValueError, match="caption-fields"):
        small(tmp_path, "--caption-fields", "title,summary")


# ---------------------------------------------------------------- the world's design


def test_similar_classes_look_alike(tmp_path):
    """Class-mean images of semantically close classes (by the CLIP text embedding) are more alike
    than those of unrelated classes."""
    d = data.load_data(opts(tmp_path, "--num-train", "200", "--num-test-per-class", "30"))
    x = d.test.images.float().flatten(1) / 255
    y = torch.tensor(d.test.labels)
    means = torch.stack([x[y == c].mean(0) for c in range(100)])
    means = means - means.mean(0)
    means = means / means.norm(dim=1, keepdim=True)
    img_sim = means @ means.T
    e = torch.nn.functional.normalize(classes.load_head("openclip-vitb32-laion400m", d.imagenet_ids), dim=1)
    e = torch.nn.functional.normalize(e - e.mean(0), dim=1)
    txt_sim = e @ e.T
    off = ~torch.eye(100, dtype=torch.bool)
    assert spearmanr(txt_sim[off], img_sim[off]).statistic > 0.1
    near = txt_sim.masked_fill(~off, -9).topk(5, dim=1).indices
    far = txt_sim.masked_fill(~off, 9).topk(50, dim=1, largest=False).indices
    assert img_sim.gather(1, near).mean() > img_sim.gather(1, far).mean() + 0.1
    # e.g. two dog breeds vs a dog and a volcano-like unrelated class
    names = d.classnames
    a, b = names.index("Shih Tzu"), names.index("Chihuahua")
    assert img_sim[a, b] > img_sim[a].median()


def test_image_sizes(tmp_path):
    d = data.load_data(opts(tmp_path, "--num-train", "200", "--num-test-per-class", "1", "--image-size", "64"))
    assert d.train.images.shape[1:] == (3, 64, 64) and d.train.images.dtype == torch.uint8
    x, y, c = d.train[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and isinstance(c, str)
    with pytest.raises(ValueError, match="image-size"):
        data.load_data(opts(tmp_path, "--image-size", "48"))


# ---------------------------------------------------------------- frequency estimation (Appx. B.2)


def test_lemmatizer():
    cases = {"puppies": "puppy", "wolves": "wolf", "boxes": "box", "churches": "church", "dogs": "dog",
             "geese": "goose", "mice": "mouse", "glass": "glass", "cactus": "cactus", "species": "species",
             "knives": "knife", "dog": "dog", "bus": "bus", "dishes": "dish"}
    for word, lemma in cases.items():
        assert classes.lemmatize_noun(word) == lemma, word


def test_estimate_class_frequency_hand_written():
    classnames = ["goldfish", "great white shark", "tiger", "crane", "hot dog"]
    synonyms = [["goldfish", "carassius auratus"], ["great white shark", "white shark", "man-eater"],
                ["tiger", "panthera tigris"], ["crane"], ["hot dog", "frankfurter"]]
    captions = [
        "My GOLDFISH swimming!",                        # 0: case, punctuation
        "two goldfishes and a Tiger",                   # 0, 2: plural lemmatised
        "Shark, white, great, in the bay",              # 1: set-level match, any order
        "a great shark",                                # none: 'white' missing
        "the man-eater of the deep",                    # 1: hyphenated synonym
        "construction crane on the site",               # none: negative word 'construction'
        "a crane standing in the marsh",                # 3
        "Frankfurters at the game",                     # 4: synonym, plural
        "a dog that is hot",                            # 4: set-level matching accepts this
        "tigers",                                       # 2
        "nothing to see here",                          # none
    ]
    counts, matches = classes.estimate_class_frequency(captions, classnames, synonyms,
                                                    negatives={"crane": ["construction"]})
    assert matches == [[0], [0, 2], [1], [], [1], [], [3], [4], [4], [2], []]
    assert counts.tolist() == [2, 2, 2, 1, 2]
    with pytest.raises(ValueError, match="unknown class"):
        classes.estimate_class_frequency(captions, classnames, synonyms, negatives={"zebra": ["x"]})


def test_estimated_frequency_of_synthetic_captions_tracks_counts(tmp_path):
    """Appx. B.2 on the synthetic world: counting class mentions in natural captions recovers the
    long-tailed profile (noisily: titles miss the class, tags name other classes)."""
    d = small(tmp_path, "--profile", "laionet-0.7", "--class-name", "none")
    counts, matches = classes.estimate_class_frequency(d.train.captions(), d.classnames, d.synonyms)
    assert spearmanr(counts, d.train_counts).statistic > 0.8
    hit = np.mean([y in m for y, m in zip(d.train.labels, matches)])
    assert 0.8 < hit < 1.0


def test_count_freq_cli(tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("a goldfish in a bowl\nGoldfish and a tench\nsunset\n")
    out = tmp_path / "freq.txt"
    r = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "count-freq", str(f), "--classes", "in1k",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names, counts = classes.read_frequency_table(str(out))
    assert len(names) == 1000 and counts[1] == 2 and counts[0] == 1 and counts.sum() == 3
    r = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "count-freq", str(tmp_path / "nope.txt")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "nope.txt" in r.stderr
    # the paper's negative words (Appx. B.2): 'ram' (the sheep, class 348) is not a memory chip, and the
    # 'crane' synonym (class 517, the machine) is not a bird; a word of a negative phrase suffices
    f.write_text("a ram on the hill\nram memory chip\nrandom ram\na crane lifting steel\na crane bird\n")
    for negatives, ram, crane in [("paper", 1, 1), ("none", 3, 2)]:
        r = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "count-freq", str(f), "--classes", "in1k",
                            "--negatives", negatives, "--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        counts = classes.read_frequency_table(str(out))[1]
        assert (counts[348], counts[517]) == (ram, crane), negatives


# ---------------------------------------------------------------- heads and profiles


def test_load_head(tmp_path):
    ids = classes.imagenet100_ids()
    full = torch.load(os.path.join(REPO, "metadata", "heads", "in1k_clip_rn50_wit400m_a+cname.pt"), weights_only=True)
    w = classes.load_head("clip-rn50", ids)
    assert w.shape == (100, 1024) and w.dtype == torch.float32 and torch.equal(w, full[ids].float())
    assert classes.load_head("roberta", ids).shape == (100, 1024)
    assert classes.load_head("openclip-vitb32-laion400m", ids).shape == (100, 512)
    own = torch.randn(100, 16)
    torch.save(own, tmp_path / "h.pt")
    assert torch.equal(classes.load_head(str(tmp_path / "h.pt"), ids), own)
    torch.save({"prototypes": own[:3], "classnames": ["a", "b", "c"]}, tmp_path / "d.pt")
    assert torch.equal(classes.load_head(str(tmp_path / "d.pt"), [-1, -1], classnames=["c", "a"]), own[[2, 0]])
    torch.save(torch.randn(7, 16), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt has 7 classes; the data has 100"):
        classes.load_head(str(tmp_path / "bad.pt"), ids)
    with pytest.raises(FileNotFoundError, match="nohead"):
        classes.load_head(str(tmp_path / "nohead.pt"), ids)


def test_profiles_and_class_sets():
    names = classes.profile_names()
    for p in ["incaps", "laionet-0.7", "laionet-0.75", "laionet-match-incaps", "yfcc15m", "yfcc15m-cls",
              "laion400m", "laion2b", "metaclip-400m", "cc12m", "incaps-title-only", "uniform"]:
        assert p in names
        assert len(classes.frequency_profile(p, list(range(1000)))) == 1000
    with pytest.raises(ValueError, match="unknown frequency profile"):
        classes.frequency_profile("nonesuch", [1, 2])
    # rand<K>: the authors' create_incaps_subsets.py draw, np.random.seed(42); np.random.choice(1000, K, False)
    # (a RandomState is that same generator, without touching the global one)
    authors = np.random.RandomState(42).choice(1000, 100, replace=False)
    assert classes.select_classes("rand100") == sorted(authors.tolist())
    assert classes.select_classes("rand7:7") == sorted(np.random.RandomState(7).choice(1000, 7, replace=False).tolist())
    assert len(set(classes.select_classes("rand7"))) == 7 and classes.select_classes("rand7:7") != classes.select_classes("rand7")
    assert classes.select_classes("7,3,999") == [7, 3, 999]
    for bad in ["in200", "rand0", "rand1001", "rand5:", "rand5:x", "3,3", "1000", "1,,2", "1, 2"]:
        with pytest.raises(ValueError, match="class set"):
            classes.select_classes(bad)


# ---------------------------------------------------------------- real-data loaders and fixtures


WNIDS = classes.imagenet_wnids()
IN100 = classes.imagenet100_ids()


def png(path, colour=(255, 0, 0), size=12):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def make_val(root, ids, per_class=2):
    for i in ids:
        for k in range(per_class):
            png(os.path.join(root, WNIDS[i], f"v{k}.png"), (k * 40, 0, 0))


def test_incaps_loader(tmp_path):
    root = tmp_path / "incaps"
    entries = []
    for k, i in enumerate(IN100[:3] + [0]):  # class 0 (tench) is not in ImageNet-100: open-world material
        for j in range(k + 1):
            fn = f"{WNIDS[i]}_{j}.JPEG"
            png(str(root / "train" / WNIDS[i] / fn), (j * 20, k * 50, 0))
            entries.append(dict(wnid=WNIDS[i], filename=fn, title=f"title {k}", description=f"desc {k}",
                                tags=["tag", f"t{k}"]))
    (root / "imagenet_captions.json").write_text(json.dumps(entries))
    make_val(str(root / "val"), IN100[:3])
    a = opts(tmp_path, "--data", "incaps", "--data-root", str(root), "--caption-fields", "title,tags", "--image-size", "8")
    d = data.load_data(a)
    assert len(d.train) == 1 + 2 + 3 and d.train_counts[:3].tolist() == [1, 2, 3] and d.train_counts.sum() == 6
    x, y, c = d.train[1]
    # the released caption variants' format: the class name, then title, tags, description
    assert x.shape == (3, 8, 8) and y == 1 and c == f"{d.classnames[1]} title 1 tag t1"
    assert len(d.test) == 6 and sorted(set(d.test.labels)) == [0, 1, 2]
    ow = data.load_data(opts(tmp_path, "--data", "incaps", "--data-root", str(root), "--open-world", "1"))
    assert ow.open_world_names == [classes.imagenet_classnames()[0]] and (ow.train.labels == -1).sum() == 4
    # JSON Lines with a malformed line names the line
    (root / "bad.jsonl").write_text(json.dumps(entries[0]) + "\n" + '{"wnid": "n01440764"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        data.load_data(opts(tmp_path, "--data", "incaps", "--data-root", str(root), "--train-file", str(root / "bad.jsonl")))
    # an unknown wnid is named
    (root / "w.json").write_text(json.dumps([dict(wnid="n00000000", filename="x.png")]))
    with pytest.raises(ValueError, match="n00000000"):
        data.load_data(opts(tmp_path, "--data", "incaps", "--data-root", str(root), "--train-file", str(root / "w.json")))


def test_tsv_labels_by_name_synonym_or_wnid(tmp_path):
    """With all 1,000 classes: a class's own name wins over another class's synonym ('partridge' is also a
    synonym of ruffed grouse), a wnid names its class, and a synonym of several classes is refused."""
    names, syns, wnids = classes.imagenet_classnames(), classes.imagenet_synonyms(), classes.imagenet_wnids()
    png(str(tmp_path / "img" / "0.png"))
    partridge = names.index("partridge")
    assert any("partridge" in [x.lower() for x in syns[c]] for c in range(partridge))  # an earlier class's synonym
    owners = {}
    for c, ss in enumerate(syns):
        for x in {x.lower() for x in ss}:
            owners.setdefault(x, []).append(c)
    lowered = {n.lower() for n in names}
    shared = sorted(x for x, cs in owners.items() if len(cs) > 1 and x not in lowered)[0]
    write_tsv(tmp_path / "names.tsv", [("img/0.png", "partridge", "x"), ("img/0.png", wnids[7], "x")])
    flags = ["--data", "tsv", "--classes", "in1k", "--image-size", "8"]
    d = data.load_data(opts(tmp_path, *flags, "--train-file", str(tmp_path / "names.tsv")), need_test=False)
    assert d.train.labels.tolist() == [partridge, 7]
    write_tsv(tmp_path / "shared.tsv", [("img/0.png", shared, "x")])
    with pytest.raises(ValueError, match=r"shared\.tsv:2: label .* is a synonym of several classes"):
        data.load_data(opts(tmp_path, *flags, "--train-file", str(tmp_path / "shared.tsv")), need_test=False)


def write_tsv(path, rows, header="filepath\tlabel\tcaption"):
    path.write_text(header + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))


def test_tsv_loader(tmp_path):
    for k in range(4):
        png(str(tmp_path / "img" / f"{k}.png"), (k * 60, 0, 0))
    make_val(str(tmp_path / "val"), IN100[:2])
    rows = [("img/0.png", 0, "a robin"), ("img/1.png", "American robin", "another bird"),
            ("img/2.png", 1, "lizard"), (str(tmp_path / "img" / "3.png"), "gila monster", "heloderma")]
    write_tsv(tmp_path / "train.tsv", rows)
    a = opts(tmp_path, "--data", "tsv", "--train-file", str(tmp_path / "train.tsv"), "--val-root",
             str(tmp_path / "val"), "--image-size", "8")
    d = data.load_data(a)
    assert d.train.labels.tolist() == [0, 0, 1, 1] and d.train[2][2] == "lizard"
    assert d.train_counts[:2].tolist() == [2, 2] and len(d.test) == 4
    t = data.load_data(argparse.Namespace(**{**vars(a), "captions": "template"}))
    assert "American robin" in t.train[0][2]
    # a file saved with a byte-order mark (spreadsheet exports) reads the same
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "train.tsv").read_bytes())
    bom = data.load_data(argparse.Namespace(**{**vars(a), "train_file": str(tmp_path / "bom.tsv")}))
    assert bom.train.labels.tolist() == d.train.labels.tolist()
    # a TSV quote is just a character (web captions): an unclosed one must not swallow the following rows
    quoted = [("img/0.png", 0, '"Best robin" ever'), ("img/1.png", 0, '"unclosed'), ("img/2.png", 1, "lizard")]
    write_tsv(tmp_path / "quotes.tsv", quoted)
    q = data.load_data(argparse.Namespace(**{**vars(a), "train_file": str(tmp_path / "quotes.tsv")}))
    assert [q.train[i][2] for i in range(3)] == ['"Best robin" ever', '"unclosed', "lizard"]
    # bad input: malformed row, label outside the class list, unknown class name, missing file
    write_tsv(tmp_path / "short.tsv", [("img/0.png", 0, "ok"), ("img/1.png", 3)])
    with pytest.raises(ValueError, match=r"short\.tsv:3: expected 3 columns"):
        data.load_data(argparse.Namespace(**{**vars(a), "train_file": str(tmp_path / "short.tsv")}))
    write_tsv(tmp_path / "range.tsv", [("img/0.png", 100, "x")])
    with pytest.raises(ValueError, match=r"range\.tsv:2: label 100 outside"):
        data.load_data(argparse.Namespace(**{**vars(a), "train_file": str(tmp_path / "range.tsv")}))
    write_tsv(tmp_path / "name.tsv", [("img/0.png", "unicorn", "x")])
    with pytest.raises(ValueError, match="'unicorn'"):
        data.load_data(argparse.Namespace(**{**vars(a), "train_file": str(tmp_path / "name.tsv")}))
    write_tsv(tmp_path / "hdr.tsv", [("img/0.png", 0, "x")], header="path\tlabel\ttext")
    with pytest.raises(ValueError, match=r"hdr\.tsv:1"):
        data.load_data(argparse.Namespace(**{**vars(a), "train_file": str(tmp_path / "hdr.tsv")}))
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        data.load_data(argparse.Namespace(**{**vars(a), "train_file": str(tmp_path / "missing.tsv")}))


def test_unreadable_images_are_skipped_then_stop(tmp_path, capsys):
    for k in range(9):
        png(str(tmp_path / "img" / f"{k}.png"))
    (tmp_path / "img" / "9.png").write_bytes(b"not a png")
    make_val(str(tmp_path / "val"), IN100[:1])
    write_tsv(tmp_path / "t.tsv", [(f"img/{k}.png", 0, "c") for k in range(10)])
    base = ["--data", "tsv", "--train-file", str(tmp_path / "t.tsv"), "--val-root", str(tmp_path / "val"),
            "--image-size", "8"]
    d = data.load_data(opts(tmp_path, *base, "--max-bad-frac", "0.2"))
    items = [d.train[i] for i in range(10)]
    assert len(items) == 10 and len(d.train.bad) == 1
    assert torch.equal(items[9][0], items[0][0])  # the unreadable sample 9 was replaced by sample 0
    assert "9.png" in capsys.readouterr().err
    d = data.load_data(opts(tmp_path, *base, "--max-bad-frac", "0.05"))
    with pytest.raises(ValueError, match="more than --max-bad-frac"):
        [d.train[i] for i in range(10)]


def test_bad_image_fraction_is_judged_on_the_files_a_worker_reads(tmp_path):
    """A DataLoader worker reads only its share: 4 bad files in the 20 it reads are 20 %, not 4 of 40."""
    for k in range(40):
        if k % 5 == 0:
            (tmp_path / f"{k}.png").write_bytes(b"not a png")
        else:
            png(str(tmp_path / f"{k}.png"))
    files = sources.FileTestSet([str(tmp_path / f"{k}.png") for k in range(40)], [0] * 40, None, max_bad_frac=0.1)
    with pytest.raises(ValueError, match="more than --max-bad-frac 0.1"):
        [files[i] for i in range(20)]  # the first half, as one of two workers
    with pytest.raises(ValueError, match="more than --max-bad-frac"):  # and through a 2-worker DataLoader
        list(torch.utils.data.DataLoader(sources.FileTestSet(files.paths, [0] * 40, lambda im: 0, 0.1), num_workers=2))


def test_imagefolder_loader_and_extra_eval(tmp_path):
    root = tmp_path / "folder"
    for name, n in [("cats", 3), ("dogs", 1)]:
        for k in range(n):
            png(str(root / "train" / name / f"{k}.png"))
        png(str(root / "val" / name / "v.png"))
    folder = ("--data", "imagefolder", "--data-root", str(root), "--image-size", "8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # template captions are the default where the data has none
        d = data.load_data(opts(tmp_path, *folder))
    with pytest.warns(UserWarning, match="no captions; using template captions"):
        assert data.load_data(opts(tmp_path, *folder, "--captions", "natural")).train[0][2] == d.train[0][2]
    assert d.classnames == ["cats", "dogs"] and d.train_counts.tolist() == [3, 1] and d.imagenet_ids == [-1, -1]
    assert d.train[0][2] in {t("cats") for t in classes.caption_templates()}  # template captions
    with pytest.raises(ValueError, match="--open-world needs captions"):
        data.load_data(opts(tmp_path, *folder, "--open-world", "10"))
    # DIR/<class>/* beside DIR/val (no train/ folder): val is the test set, not a class
    flat = tmp_path / "flat"
    for name in ("cats", "dogs"):
        png(str(flat / name / "0.png"))
    png(str(flat / "val" / "cats" / "v.png"))
    f = data.load_data(opts(tmp_path, "--data", "imagefolder", "--data-root", str(flat), "--image-size", "8"))
    assert f.classnames == ["cats", "dogs"] and len(f.train) == 2 and len(f.test) == 1
    # no test set: an error, except for a caller that evaluates on other data (DINO's pre-training)
    no_val = tmp_path / "no_val"
    png(str(no_val / "train" / "cats" / "0.png"))
    with pytest.raises(ValueError, match="needs a test set"):
        data.load_data(opts(tmp_path, "--data", "imagefolder", "--data-root", str(no_val)))
    pretrain = data.load_data(opts(tmp_path, "--data", "imagefolder", "--data-root", str(no_val)), need_test=False)
    assert pretrain.test is None and pretrain.classnames == ["cats"] and len(pretrain.train) == 1
    # ImageNet-V2 layout (folders named by class index) as an extra evaluation set of a synthetic run
    v2 = tmp_path / "v2"
    for i in [IN100[0], IN100[5], 0]:  # class 0 is not in ImageNet-100: skipped
        png(str(v2 / str(i) / "a.png"))
    with pytest.warns(UserWarning, match="98 of the 100 evaluated classes have no folder"):
        s = data.load_data(opts(tmp_path, "--num-train", "200", "--num-test-per-class", "1", "--extra-eval",
                                f"v2={v2}"))
    ev = s.extra_eval["v2"]
    assert sorted(ev.labels.tolist()) == [0, 5]
    # a folder named by a WordNet synonym of an evaluated class (not its CLIP name) is that class
    names, lowered = s.classnames, {n.lower() for n in s.classnames}
    k, synonym = next((k, x) for k in range(100) for x in classes.imagenet_synonyms()[IN100[k]]
                      if x.lower() not in lowered)
    png(str(tmp_path / "by_name" / synonym / "a.png"))
    with pytest.warns(UserWarning, match="99 of the 100"):
        folder = sources.eval_image_folder(str(tmp_path / "by_name"), names, s.imagenet_ids, None)
    assert folder.labels.tolist() == [k]
    x, y = ev[0]
    assert x.shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_data(opts(tmp_path, "--num-train", "200", "--extra-eval", f"x={tmp_path / 'nowhere'}"))
    with pytest.raises(ValueError, match="NAME=DIR"):
        data.load_data(opts(tmp_path, "--num-train", "200", "--extra-eval", "justadir"))


def test_cifar100_lt_loader(tmp_path):
    folder = tmp_path / "c" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class_{k}" for k in range(100)]
    train_labels = np.repeat(np.arange(100), 20)
    for split, labels in [("train", train_labels), ("test", np.repeat(np.arange(100), 2))]:
        with open(folder / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8),
                         "fine_labels": labels.tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names}, f)
    d = data.load_data(opts(tmp_path, "--data", "cifar100-lt", "--data-root", str(tmp_path / "c"), "--imbalance", "10",
                            "--captions", "template"))
    expected = [int(20 * 10 ** (-c / 99)) for c in range(100)]  # n_max * imbalance^(-c/(C-1))
    assert d.train_counts.tolist() == expected and d.train_counts[0] / d.train_counts[-1] == 10
    assert d.classnames[3] == "class 3" and len(d.test) == 200
    x, y, c = d.train[0]
    assert x.shape == (3, 32, 32) and "class 0" in c
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        data.load_data(opts(tmp_path, "--data", "cifar100-lt", "--data-root", str(tmp_path), "--captions", "template"))


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nodir"):
        data.load_data(opts(tmp_path, "--data", "incaps", "--data-root", str(tmp_path / "nodir")))
    with pytest.raises(ValueError, match="--data-root is required"):
        data.load_data(opts(tmp_path, "--data", "imagefolder", "--captions", "template"))
    png(str(tmp_path / "r" / "train" / WNIDS[IN100[0]] / "a.png"))
    (tmp_path / "r" / "imagenet_captions.json").write_text(json.dumps([dict(wnid=WNIDS[IN100[0]], filename="a.png")]))
    with pytest.raises(FileNotFoundError, match="novalroot"):
        data.load_data(opts(tmp_path, "--data", "incaps", "--data-root", str(tmp_path / "r"), "--val-root",
                            str(tmp_path / "novalroot")))
