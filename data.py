"""The data every experiment script reads, from its flags: the embedded synthetic world (the default) or
a real source, with the paper's data variants applied (Sec. 3.4-3.6, 4.1).

Scripts use two names:
    add_data_args(parser)                       # the shared --data ... flags
    data = load_data(args, train_transform, test_transform)   -> sources.LongTailData
and read data.classnames, data.train (items: image, label, caption), data.test (items: image, label),
data.train_counts, ...  Labels index data.classnames; open-world samples (Sec. 3.6) carry label -1.
data_identity(data) is what a checkpoint records of them (runtime.RunDir refuses to resume on others).

The pieces live by concern: classes.py (names, synonyms, frequency tables, heads), world.py (the
synthetic world and its captions), sources.py (Dataset classes and the real-data readers).
`python data.py count-freq FILE` counts class mentions in captions (Appx. B.2).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import warnings

import numpy as np

from classes import (METADATA_DIR, estimate_class_frequency, frequency_profile, imagenet_classnames,
                     imagenet_synonyms, profile_table_path, select_classes, write_frequency_table)
from runtime import ArgumentParser, run_cli
from sources import (CaptionedTrainSet, FileTrainSet, ArrayTrainSet, LongTailData, SubsetTrainSet, TensorTestSet,
                     caption_options, default_transforms, eval_image_folder, label_counts, load_cifar100_lt,
                     load_imagefolder, load_incaps, load_tsv, need_path, table_reader)
from world import PALETTE, POSITIONS, WorldSpec, Concept, _related_names, build_caption, build_world, scale_counts

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "clip-beyond-tail")


# ---- The data flags and load_data ---------------------------------------------------------------------

def _fraction(text):
    """'1/8' or '0.125' -> 0.125 (for --subset-frac)."""
    try:
        num, _, den = str(text).partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r}")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"fraction must be in (0, 1], got {text!r}")
    return value


def add_data_args(parser):
    """Add the shared data flags to a script's argparse parser (returns the parser)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=["synthetic", "incaps", "tsv", "imagefolder", "cifar100-lt"],
                   help="synthetic = the embedded long-tailed world (default); real formats need --data-root/--train-file")
    g.add_argument("--data-root", default=None, help="root folder of the real data set (see README)")
    g.add_argument("--train-file", default=None, help="--data tsv: TSV with header filepath, label, caption; "
                   "--data incaps: the ImageNet-Captions json (default DATA_ROOT/imagenet_captions.json)")
    g.add_argument("--val-root", default=None, help="ImageFolder of ImageNet val (wnid folders) used as test set")
    g.add_argument("--extra-eval", action="append", default=[], metavar="NAME=DIR",
                   help="extra test ImageFolder (wnid, ImageNet-index or class-name folders); repeatable")
    g.add_argument("--classes", default="in100",
                   help="in100 (default), in1k, rand<K>[:SEED] (K random ImageNet classes: the authors' draw, seed 42, "
                   "unless SEED), or ImageNet indices separated by commas")
    g.add_argument("--profile", default="incaps", help="class-frequency profile of the synthetic training set: "
                   "a name from metadata/freqs (incaps, laionet-0.7, yfcc15m, laion400m, ...), 'uniform', or a table file")
    g.add_argument("--num-train", type=int, default=15000, help="synthetic: labelled training images in total")
    g.add_argument("--num-test-per-class", type=int, default=50, help="synthetic: balanced test images per class")
    g.add_argument("--image-size", type=int, default=None, help="32 (synthetic default) or 64; real data: 224")
    g.add_argument("--diversity", type=float, default=0.75, help="synthetic intra-class diversity: a sample's "
                   "mean cosine to its class embedding is 1/sqrt(1+d^2) (the analogue of LAIONet's threshold)")
    g.add_argument("--world-head", default="openclip-vitb32-laion400m",
                   help="text embeddings the synthetic appearance is derived from")
    g.add_argument("--captions", default=None, choices=["template", "template-synset", "natural"],
                   help="default: natural where the data has captions, else template")
    g.add_argument("--caption-fields", default="title,description,tags",
                   help="natural captions: comma-separated subset of title,description,tags")
    g.add_argument("--class-name", default=None, choices=["front", "end", "none"],
                   help="name the class once more in every caption: in front ('{name} {caption}', the authors' "
                   "released ImageNet-Captions variants), at the end, or not. Default: in front for --data incaps, "
                   "at the end on the synthetic world (whose 2-layer text tower would otherwise learn to read the "
                   "class from the first words, which CLIP's 80 zero-shot prompts put last), else not (TSV captions "
                   "are used as they are)")
    g.add_argument("--open-world", type=int, default=0, metavar="N",
                   help="add N other ImageNet classes present only in images+captions (label -1, Sec. 3.6)")
    g.add_argument("--trim-tail", type=int, default=0, metavar="K", help="cut the K least frequent classes (Sec. 4.1)")
    g.add_argument("--tail-shots", type=int, default=1, choices=[0, 1], help="shots left in each trimmed class")
    g.add_argument("--subset-frac", type=_fraction, default=1.0, help="uniform fraction of the training set "
                   "(e.g. 1/8), every class kept at least once")
    g.add_argument("--subset-size", type=int, default=None, help="uniform subset of exactly this many samples")
    g.add_argument("--freq-match", default=None, metavar="PROFILE",
                   help="resample the training set to this profile's class frequencies (the '=freq' variant)")
    g.add_argument("--imbalance", type=float, default=100, help="CIFAR-100-LT imbalance factor (10, 50, 100)")
    g.add_argument("--max-bad-frac", type=float, default=0.01,
                   help="stop when more than this fraction of images cannot be read")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the world, variants, captions and augmentation")
    g.add_argument("--cache-dir", default=os.environ.get("CLIP_BEYOND_TAIL_CACHE", DEFAULT_CACHE_DIR),
                   help="where the rendered synthetic world is cached")
    return parser


def _data_flag_defaults():
    """{dest: default} of the shared data flags (add_data_args)."""
    return vars(add_data_args(argparse.ArgumentParser()).parse_args([]))


def _data_options(args):
    """args (a Namespace, possibly lacking some data flags) merged over the flag defaults."""
    opts = _data_flag_defaults()
    opts.update({k: v for k, v in vars(args).items() if k in opts})
    return argparse.Namespace(**opts)



def check_data_options(opts):
    """The numeric data flags lie in their ranges (nan fails every comparison, so it is caught too)."""
    if opts.image_size is not None and not opts.image_size >= 1:
        raise ValueError(f"--image-size must be >= 1, got {opts.image_size}")
    if opts.num_train < 1 or opts.num_test_per_class < 1:
        raise ValueError("--num-train and --num-test-per-class must be >= 1")
    select_classes(opts.classes)  # also with real data, where the folders name the classes: no silent typo
    profile_table_path(opts.profile)
    if not 0 <= opts.diversity < math.inf:
        raise ValueError(f"--diversity must be a finite number >= 0, got {opts.diversity}")
    if not 0 <= opts.max_bad_frac <= 1:
        raise ValueError(f"--max-bad-frac must be in [0, 1], got {opts.max_bad_frac}")
    if opts.data == "cifar100-lt" and not 1 <= opts.imbalance < math.inf:
        raise ValueError(f"--imbalance (largest / smallest class) must be a finite number >= 1, got {opts.imbalance}")
    if opts.subset_size is not None and opts.subset_frac < 1:
        raise ValueError("give --subset-size or --subset-frac, not both")
    if opts.freq_match is not None:  # checked before loading: a typo fails here, and "" is not ignored
        if not opts.freq_match:
            raise ValueError("--freq-match needs a profile name or a table file")
        profile_table_path(opts.freq_match)
    names = [spec.partition("=")[0] for spec in opts.extra_eval]
    if len(set(names)) < len(names):
        raise ValueError(f"--extra-eval names must differ, got {names}")


def load_data(args, train_transform=None, test_transform=None, need_test=True):
    """Build the data the flags describe (see add_data_args). Transforms default to
    default_transforms(): the paper's light RandomResizedCrop + CLIP normalisation (synthetic images
    are uint8 tensors, real ones PIL). Variants (--subset-frac, --subset-size, --freq-match,
    --trim-tail) are applied in that order, then --extra-eval sets are attached. need_test=False (DINO's
    pre-training, which evaluates on other data): real data without a test set gets test None."""
    opts = _data_options(args)
    opts.need_test = need_test
    check_data_options(opts)
    loaders = {"synthetic": _load_synthetic, "incaps": load_incaps, "tsv": load_tsv,
               "imagefolder": load_imagefolder, "cifar100-lt": load_cifar100_lt}
    if opts.data not in loaders:
        raise ValueError(f"--data must be one of {', '.join(loaders)}, got {opts.data!r}")
    has_captions = opts.data not in ("imagefolder", "cifar100-lt")
    if opts.captions is None:
        opts.captions = "natural" if has_captions else "template"
    elif opts.captions == "natural" and not has_captions:
        warnings.warn(f"--data {opts.data} has no captions; using template captions (--captions template)")
        opts.captions = "template"
    if opts.open_world and opts.data not in ("synthetic", "incaps"):
        raise ValueError(f"--open-world needs captions that name other concepts: --data synthetic or incaps, "
                         f"not {opts.data}")
    if opts.val_root and opts.data == "synthetic":
        raise ValueError("--val-root is for real data; the synthetic world has its own balanced test split")
    data = loaders[opts.data](opts, train_transform, test_transform)
    data = apply_variants(data, opts)
    size = opts.image_size or (32 if opts.data in ("synthetic", "cifar100-lt") else 224)
    pil_test = test_transform if (test_transform and opts.data != "synthetic") else default_transforms(size, False)[1]
    for spec in opts.extra_eval:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--extra-eval expects NAME=DIR, got {spec!r}")
        data.extra_eval[name] = eval_image_folder(folder, data.classnames, data.imagenet_ids, pil_test,
                                                  opts.max_bad_frac)
    return data


def data_flag_names():
    """The dests of the shared data flags (add_data_args)."""
    return set(_data_flag_defaults())


# ---- The embedded synthetic world as datasets (world.py renders it) -----------------------------------

class SyntheticTrainSet(CaptionedTrainSet):
    def __init__(self, images, labels, concepts, attrs, clutter, caption_args, head, transform, seed):
        super().__init__(labels, transform, seed)
        self.images, self.concepts, self.attrs, self.clutter = images, concepts.numpy(), attrs.numpy(), clutter.numpy()
        self.caption_args = caption_args
        names, syns, related = imagenet_classnames(), imagenet_synonyms(), _related_names(head)
        self._concept = {c: Concept(names[c], syns[c], related[c]) for c in set(self.concepts.tolist())}
        self._names = names

    def _image(self, i):
        return self.images[i]

    def _caption(self, rng, i):
        colour, pos, size, bg = self.attrs[i]
        palette = list(PALETTE)
        attrs = (palette[colour], POSITIONS[pos], size, palette[bg])
        clutter_names = [self._names[c] for c in self.clutter[i] if c >= 0]
        return build_caption(rng, self._concept[int(self.concepts[i])], attrs=attrs, clutter_names=clutter_names,
                             other_names=self._names, **self.caption_args)


def _load_synthetic(opts, train_transform, test_transform):
    size = opts.image_size or 32
    if size not in (32, 64):
        raise ValueError(f"--image-size {size}: the synthetic world renders 32 or 64 px")
    class_ids = select_classes(opts.classes)
    counts = scale_counts(frequency_profile(opts.profile, class_ids), opts.num_train)
    # open-world concepts: other ImageNet classes, counted like the evaluated ones (same profile, same scale)
    others = sorted(set(range(1000)) - set(class_ids))
    if not 0 <= opts.open_world <= len(others):
        raise ValueError(f"--open-world must be in [0, {len(others)}], got {opts.open_world}")
    rng = np.random.default_rng([opts.data_seed, 11])
    ow_ids = sorted(rng.choice(others, opts.open_world, replace=False).tolist()) if opts.open_world else []
    ow_counts = []
    if ow_ids:
        p_eval, p_ow = frequency_profile(opts.profile, class_ids), frequency_profile(opts.profile, ow_ids)
        ow_counts = np.round(p_ow / p_eval.sum() * opts.num_train).astype(np.int64).tolist()
    spec = WorldSpec(class_ids=tuple(class_ids), train_counts=tuple(int(c) for c in counts),
                     open_world_ids=tuple(ow_ids), open_world_counts=tuple(int(c) for c in ow_counts),
                     num_test_per_class=opts.num_test_per_class, image_size=size, diversity=float(opts.diversity),
                     detail=0.5, clutter=0.5, noise=0.04, head=opts.world_head, seed=opts.data_seed)
    world = build_world(spec, opts.cache_dir)
    label_of = {c: i for i, c in enumerate(class_ids)}
    train_labels = np.array([label_of.get(c, -1) for c in world["train_concepts"].tolist()], dtype=np.int64)
    test_labels = np.array([label_of[c] for c in world["test_concepts"].tolist()], dtype=np.int64)
    default_train, default_test = default_transforms(size, tensor_images=True)
    train = SyntheticTrainSet(world["train_images"], train_labels, world["train_concepts"], world["train_attrs"],
                              world["train_clutter"], caption_options(opts), opts.world_head,
                              train_transform or default_train, opts.data_seed)
    test = TensorTestSet(world["test_images"], test_labels, test_transform or default_test)
    names, syns = imagenet_classnames(), imagenet_synonyms()
    data = LongTailData(classnames=[names[c] for c in class_ids], synonyms=[syns[c] for c in class_ids],
                        imagenet_ids=list(class_ids), train_counts=np.asarray(counts, dtype=np.int64),
                        train=train, test=test, open_world_names=[names[c] for c in ow_ids], open_world_ids=list(ow_ids),
                        info=dict(data="synthetic", world=spec.key(), profile=opts.profile))
    return data


def balanced_world(args, class_spec, train_per_class, test_per_class, transform):
    """A balanced synthetic world of the classes `class_spec` (a --classes value) that looks like the one
    `args` describes (data seed, diversity, image size, appearance head, caption kind), every other data
    flag at its default: the synthetic linear-probe tasks of dino_tail.py."""
    opts = argparse.Namespace(**_data_flag_defaults())
    for key in ("data_seed", "diversity", "image_size", "world_head", "cache_dir", "captions"):
        setattr(opts, key, getattr(args, key))
    opts.profile, opts.classes, opts.num_test_per_class = "uniform", class_spec, test_per_class
    opts.num_train = train_per_class * len(select_classes(class_spec))
    return load_data(opts, train_transform=transform, test_transform=transform)

# ---- Dataset variants (Sec. 3.4, 3.5, 4.1), deterministic from --data-seed ------------------------------

def uniform_subset(labels, n_keep, rng):
    """n_keep indices drawn uniformly without replacement, keeping every present class (label >= 0) at
    least once (Sec. 3.5: fractions 1/2 ... 1/32 of the data)."""
    labels = np.asarray(labels)
    classes = np.unique(labels[labels >= 0])
    if not len(classes) <= n_keep <= len(labels):
        raise ValueError(f"subset size {n_keep} must be between {len(classes)} (one per class) and {len(labels)}")
    perm = rng.permutation(len(labels))
    first = {}
    for i in perm:  # the first occurrence of each class in a random order: one random sample per class
        if labels[i] >= 0 and labels[i] not in first:
            first[labels[i]] = i
    chosen = np.fromiter(first.values(), dtype=np.int64)
    rest = perm[~np.isin(perm, chosen)][: n_keep - len(chosen)]
    return np.sort(np.concatenate([chosen, rest]))


def frequency_matched_subset(labels, target, rng, target_size=None):
    """Resample to the class frequencies `target` [C] (the '=freq' variant, Sec. 3.4): class c keeps
    min(round(p_c * S), n_c) random samples, p = target / sum(target), n_c what the class has. S is the
    target set's own size, as the authors' create_laionet_match_freq.py takes the target's counts as they
    are (LAIONet to IN-Caps: few classes hit their cap), or the source's labelled size where that is
    smaller (the synthetic world) or the target has no size (target_size None, e.g. 'uniform').
    Open-world samples (label -1) are kept. Returns (kept indices, total-variation distance of the kept
    class distribution to the target)."""
    labels = np.asarray(labels)
    p = np.asarray(target, dtype=np.float64)
    p = p / p.sum()
    have = np.bincount(labels[labels >= 0], minlength=len(p))[: len(p)]
    size = have.sum() if target_size is None else min(have.sum(), target_size)
    counts = np.minimum(np.round(p * size).astype(np.int64), have)
    keep = [np.flatnonzero(labels < 0)]
    for c, n in enumerate(counts):
        keep.append(rng.permutation(np.flatnonzero(labels == c))[:n])
    distance = 0.5 * np.abs(counts / max(counts.sum(), 1) - p).sum()
    return np.sort(np.concatenate(keep)), float(distance)


def trim_tail(labels, counts, k, shots, rng):
    """Cut the k least frequent classes to `shots` samples each (Sec. 4.1, one-shot / zero-shot tails;
    a class with fewer keeps what it has). Ties in frequency are broken by a seeded random order.
    Returns (kept indices, tail classes)."""
    labels, counts = np.asarray(labels), np.asarray(counts)
    if not 0 < k < len(counts):
        raise ValueError(f"--trim-tail must be in [1, {len(counts) - 1}] (some classes must stay), got {k}")
    tie = rng.permutation(len(counts))
    tail = np.lexsort((tie, counts))[:k]  # sort by count, then by the random tie-break
    short = [int(c) for c in tail if counts[c] < shots]
    if short:  # e.g. IN-Caps' class 850 has no sample at all: it stays at zero
        warnings.warn(f"--tail-shots {shots}: tail classes {short[:5]} have fewer samples; they keep all they have")
    keep = [np.flatnonzero(~np.isin(labels, tail))]
    for c in tail:
        keep.append(rng.permutation(np.flatnonzero(labels == c))[:shots])
    return np.sort(np.concatenate(keep)), np.sort(tail)


def apply_variants(data, opts):
    """Apply --subset-frac / --subset-size, --freq-match and --trim-tail to data.train (in that order)."""
    labels = data.train.labels
    idx = np.arange(len(labels))
    rng = np.random.default_rng([opts.data_seed, 17])
    if opts.subset_size is not None or opts.subset_frac < 1:
        n_keep = opts.subset_size if opts.subset_size is not None else int(round(opts.subset_frac * len(idx)))
        idx = idx[uniform_subset(labels[idx], n_keep, rng)]
    if opts.freq_match:
        target = frequency_profile(opts.freq_match, data.imagenet_ids) if min(data.imagenet_ids) >= 0 else None
        if target is None:
            raise ValueError("--freq-match needs ImageNet classes")
        target_size = None if opts.freq_match == "uniform" else int(target.sum())  # tables hold counts
        matched, freq_match_distance = frequency_matched_subset(labels[idx], target, rng, target_size)
        idx = idx[matched]
    tail = None
    if opts.trim_tail:
        sub, tail = trim_tail(labels[idx], label_counts(labels[idx], len(data.classnames)), opts.trim_tail,
                              opts.tail_shots, rng)
        idx = idx[sub]
    if len(idx) == len(labels) and tail is None:
        return data
    data.train = SubsetTrainSet(data.train, idx)
    data.train_counts = label_counts(data.train.labels, len(data.classnames))
    data.tail_classes = tail
    data.info.update(subset_frac=opts.subset_frac, subset_size=opts.subset_size, freq_match=opts.freq_match,
                     trim_tail=opts.trim_tail, tail_shots=opts.tail_shots if opts.trim_tail else None)
    if opts.freq_match:
        data.info["freq_match_distance"] = freq_match_distance  # total variation to the target profile
    if tail is not None:  # the new frequency table, next to the cached data (Sec. 4.1)
        key = hashlib.sha256(json.dumps([data.info, opts.data_seed], sort_keys=True, default=str).encode()).hexdigest()[:20]
        folder = os.path.expanduser(opts.cache_dir)
        os.makedirs(folder, exist_ok=True)
        data.freq_table_path = os.path.join(folder, f"class_frequency_trim{opts.trim_tail}_shots{opts.tail_shots}_{key}.txt")
        write_frequency_table(data.freq_table_path, data.classnames, data.train_counts)
    return data


# ---- What a run trains on (checkpoints record it) -------------------------------------------------------

def data_identity(longtail):
    """What a run trains on: its classes and a digest of its training samples (saved in checkpoints). The
    flags alone do not pin it down: a code change (such as the rand<K> draw's) or a changed data folder gives
    other classes or images under the same flags."""
    digest = hashlib.sha1()
    _digest_samples(longtail.train, digest)
    return {"classnames": [str(c) for c in longtail.classnames],
            "imagenet_ids": [int(i) for i in longtail.imagenet_ids],
            "num_train": int(len(longtail.train.labels)), "train_sha1": digest.hexdigest()}


def _digest_samples(train, digest):
    """Feeds what identifies each training sample into `digest`: its label and its source (a subset's
    indices, an image file's class folder and name, a synthetic sample's concept and attributes, an array's
    pixels), and the seed its captions and augmentations are drawn from."""
    if isinstance(train, SubsetTrainSet):
        digest.update(np.ascontiguousarray(train.indices, dtype=np.int64).tobytes())
        _digest_samples(train.base, digest)
        return
    digest.update(np.ascontiguousarray(train.labels, dtype=np.int64).tobytes())
    digest.update(f"seed {getattr(train, 'seed', None)}".encode())
    if isinstance(train, FileTrainSet):  # class folder / file name: the same files under a moved root match
        digest.update("\n".join(os.path.join(*os.path.normpath(p).split(os.sep)[-2:]) for p in train.paths).encode())
    elif isinstance(train, SyntheticTrainSet):
        for array in (train.concepts, train.attrs, train.clutter):
            digest.update(np.ascontiguousarray(array).tobytes())
    elif isinstance(train, ArrayTrainSet):
        digest.update(np.ascontiguousarray(train.array).tobytes())


# ---- python data.py count-freq (Appx. B.2) -------------------------------------------------------------

def _read_caption_file(path):
    """Captions from a text file (one a line), or from the 'caption' column of a .tsv/.csv with header."""
    need_path(path, "caption file")
    if path.lower().endswith((".tsv", ".csv")):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = table_reader(f, path)
            header = [h.strip().lower() for h in next(reader, [])]
            if "caption" not in header:
                raise ValueError(f"{path}:1: no 'caption' column in the header {header}")
            col = header.index("caption")
            return [row[col] for row in reader if len(row) > col]
    with open(path, encoding="utf-8-sig") as f:
        return [line.rstrip("\n") for line in f]


def count_freq_main(argv):
    """python data.py count-freq FILE --classes in100|in1k [--negatives paper|none|JSON] [--out F]"""
    p = ArgumentParser(prog="data.py count-freq", description="Class frequencies of captions (Appx. B.2)")
    p.add_argument("file", help="captions: a text file (one a line) or a .tsv/.csv with a 'caption' column")
    p.add_argument("--classes", default="in1k", help="in100, in1k, rand<K>[:SEED] or ImageNet indices a,b,...")
    p.add_argument("--negatives", default="paper", help="'paper': the paper's negative words for nine ambiguous "
                   "classes (metadata/count_freq_negatives.json); 'none'; or a JSON file {classname: [words]}")
    p.add_argument("--out", default=None, help="write 'classname<TAB>count' lines here (default: stdout)")
    a = p.parse_args(argv)
    ids = select_classes(a.classes)
    names, syns = imagenet_classnames(), imagenet_synonyms()
    negatives = None
    if a.negatives == "paper":  # keyed by ImageNet class index
        with open(os.path.join(METADATA_DIR, "count_freq_negatives.json")) as f:
            position = {iid: k for k, iid in enumerate(ids)}
            negatives = {position[int(i)]: words for i, words in json.load(f).items() if int(i) in position}
    elif a.negatives != "none":
        with open(need_path(a.negatives, "--negatives")) as f:
            negatives = json.load(f)
    counts, matches = estimate_class_frequency(_read_caption_file(a.file), [names[i] for i in ids],
                                               [syns[i] for i in ids], negatives)
    lines = "".join(f"{names[i]}\t{c}\n" for i, c in zip(ids, counts))
    if a.out:
        with open(a.out, "w") as f:
            f.write(lines)
        print(f"{len(matches)} captions, {sum(1 for m in matches if m)} matched a class; wrote {a.out}")
    else:
        sys.stdout.write(lines)

if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "count-freq":
        run_cli(lambda: count_freq_main(sys.argv[2:]))
    else:
        sys.exit("usage: python data.py count-freq FILE --classes in100|in1k [--negatives paper|none|JSON] [--out F]")
