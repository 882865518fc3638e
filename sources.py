"""Where the training and test data come from: the Dataset classes every source shares (captioned
training items with per-sample seeded captions and augmentation, subsets, test sets), LongTailData (what
load_data returns), and the readers of real data: ImageNet-Captions, TSV subsets (LAIONet, YFCC-15M-Cls),
ImageFolders, CIFAR-100-LT, evaluation folders (ImageNet val, -V2), and the linear-probe transfer sets
of Table 2 (Appx. D.3). Nothing is ever downloaded.

data.load_data picks the reader from the --data flag; dino_tail.py reads the transfer sets with
transfer_splits(name, root, transform).
"""
import json
import os
import random
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from classes import imagenet_classnames, imagenet_synonyms, imagenet_wnids, select_classes
from world import CAPTION_FIELDS, Concept, build_caption

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip.constants.OPENAI_DATASET_STD

# ---- Datasets ----------------------------------------------------------------------------------------

def sample_rng(seed, epoch, index):
    """The random generator of one sample in one epoch: captions and augmentation depend only on
    (data seed, epoch, sample index), never on the process, worker or order that draws the sample."""
    return np.random.default_rng([seed, epoch, index])


def apply_transform_seeded(transform, image, rng):
    """Run a (random) transform with torch's and Python's global RNGs seeded from `rng`, then restore
    them: torchvision draws crop/flip parameters from the global RNG, so without this the augmentation
    of a sample would depend on the worker/process that loads it and on what ran before; with it, any
    number of processes and DataLoader workers see identical samples, resume included, and the caller's
    own RNG streams (model init, dropout) are left untouched. fork_rng(devices=[]) only saves the CPU
    generator, which costs microseconds; the CPU generator is seeded directly because torch.manual_seed
    also queues CUDA seeding, which records a stack trace each call (milliseconds)."""
    if transform is None:
        return image
    seed = int(rng.integers(2 ** 63 - 1))
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return transform(image)
        finally:
            random.setstate(py_state)


class CaptionedTrainSet(Dataset):
    """Training items (image, label, caption). Subclasses provide _image(i), _caption(rng, i).
    `labels` is an int64 array (-1 for open-world samples); call set_epoch(e) every epoch."""

    def __init__(self, labels, transform, seed):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        i = int(i)
        rng = sample_rng(self.seed, self.epoch, i)
        caption = self._caption(rng, i)
        image = apply_transform_seeded(self.transform, self._image(i), rng)
        return image, int(self.labels[i]), caption

    def captions(self, epoch=0):
        """All captions of one epoch, without loading images (for frequency estimation, tests)."""
        return [self._caption(sample_rng(self.seed, epoch, i), i) for i in range(len(self))]


class SubsetTrainSet(Dataset):
    """A view of some indices of a training set that keeps set_epoch and labels. Sample i of the view
    is sample indices[i] of the base, so its caption/augmentation equal the base's."""

    def __init__(self, base, indices):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = base.labels[self.indices]

    def set_epoch(self, epoch):
        self.base.set_epoch(epoch)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[int(self.indices[i])]

    def captions(self, epoch=0):
        caps = self.base.captions(epoch)
        return [caps[j] for j in self.indices]



class TensorTestSet(Dataset):
    """Test items (image, label) from a uint8 image tensor."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[int(i)]
        return (self.transform(img) if self.transform else img), int(self.labels[i])


class _NormalizeUint8:
    """uint8 [3,H,W] -> float, CLIP mean/std normalised."""

    def __init__(self):
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __call__(self, img):
        return (img.float() / 255 - self.mean) / self.std


def default_transforms(image_size, tensor_images):
    """The paper's light augmentation (Appx. C.1: RandomResizedCrop scale 0.9-1.0) + CLIP mean/std.
    Synthetic (uint8 tensor) and real (PIL) images get the same recipe."""
    from torchvision import transforms as T

    if tensor_images:
        train = T.Compose([T.RandomResizedCrop(image_size, scale=(0.9, 1.0), antialias=True), _NormalizeUint8()])
        return train, _NormalizeUint8()
    norm = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(0.9, 1.0)), *norm])
    test = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), *norm])
    return train, test



@dataclass
class LongTailData:
    classnames: list                 # the C evaluated classes; label = index into this list
    synonyms: list                   # per class: [name, WordNet synonyms...]
    imagenet_ids: list               # ImageNet-1k index per class (-1 if not ImageNet) -> head rows
    train_counts: np.ndarray         # training samples per evaluated class (after variants)
    train: Dataset                   # items (image, label, caption); label -1 = open-world sample
    test: Dataset                    # items (image, label)
    tail_classes: np.ndarray = None  # classes cut by --trim-tail (Sec. 4.1), else None
    open_world_names: list = field(default_factory=list)   # concepts only in images+captions (Sec. 3.6)
    open_world_ids: list = field(default_factory=list)     # their ImageNet-1k indices
    extra_eval: dict = field(default_factory=dict)         # name -> Dataset of (image, label)
    freq_table_path: str = None      # the frequency table written for a trimmed-tail variant
    info: dict = field(default_factory=dict)               # what was loaded (for args.json / logs)

    def labelled_indices(self):
        """Indices of the training samples with a label (not open-world), e.g. for train_loader(indices=)."""
        return np.flatnonzero(self.train.labels >= 0)

    def train_labelled(self):
        """The training set without open-world samples (label -1): what supervised learning uses."""
        if (self.train.labels >= 0).all():
            return self.train
        return SubsetTrainSet(self.train, self.labelled_indices())


def caption_options(opts):
    fields = tuple(f.strip() for f in opts.caption_fields.split(",") if f.strip())
    bad = [f for f in fields if f not in CAPTION_FIELDS]
    if bad or not fields:
        raise ValueError(f"--caption-fields: unknown field(s) {bad or fields}; use a subset of {','.join(CAPTION_FIELDS)}")
    class_name = opts.class_name
    if class_name is None:  # (data.py's --class-name explains these defaults)
        class_name = ("none" if opts.captions != "natural" else
                      {"synthetic": "end", "incaps": "front"}.get(opts.data, "none"))
    return dict(kind=opts.captions, fields=fields, class_name=class_name)



# ---- Real data: ImageNet-Captions, TSV, ImageFolder, CIFAR-100-LT ----------------------------------------

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


class _ImageFiles:
    """Reads image files as RGB PIL images. An unreadable file is skipped (the next readable sample is
    used instead), counted and reported; when more than max_bad_frac of the files a process has tried turn
    out unreadable (at least 20 tried, or all of a smaller set), the run stops. The count is per process:
    each DataLoader worker reads only its share of the files, so it is compared with that share."""

    def _init_files(self, paths, max_bad_frac):
        self.paths, self.max_bad_frac, self.bad, self.tried = list(paths), float(max_bad_frac), set(), set()

    def _read(self, i):
        """(index actually used, PIL image)."""
        from PIL import Image

        n = len(self.paths)
        for k in range(n):
            j = (i + k) % n
            path = self.paths[j]
            if path in self.bad:
                continue
            self.tried.add(path)
            try:
                with Image.open(path) as im:
                    return j, im.convert("RGB")
            except (OSError, ValueError) as e:  # missing, truncated, not an image
                self.bad.add(path)
                print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e}); "
                      f"{len(self.bad)} unreadable so far", file=sys.stderr)
                tried = max(len(self.tried), min(n, 20))
                if len(self.bad) > self.max_bad_frac * tried:
                    raise ValueError(f"{len(self.bad)} of {len(self.tried)} images read so far are unreadable, more "
                                     f"than --max-bad-frac {self.max_bad_frac}; first: {sorted(self.bad)[0]}")
        raise ValueError(f"none of the {n} images can be read")


class FileTrainSet(CaptionedTrainSet, _ImageFiles):
    """Training items from image files: (image, label, caption). captions[i] is the real caption (str),
    the real IN-Caps fields (dict title/description/tags) or None (template captions only)."""

    def __init__(self, paths, labels, concepts, real_captions, caption_args, transform, seed, max_bad_frac):
        CaptionedTrainSet.__init__(self, labels, transform, seed)
        self._init_files(paths, max_bad_frac)
        self.concepts, self.real_captions, self.caption_args = concepts, real_captions, caption_args

    def _caption(self, rng, i):
        return build_caption(rng, self.concepts[i], real_fields=self.real_captions[i], **self.caption_args)

    def __getitem__(self, i):
        rng = sample_rng(self.seed, self.epoch, int(i))
        j, image = self._read(int(i))
        caption = self._caption(rng, j)
        return apply_transform_seeded(self.transform, image, rng), int(self.labels[j]), caption


class FileTestSet(Dataset, _ImageFiles):
    """Test items (image, label) from image files."""

    def __init__(self, paths, labels, transform, max_bad_frac):
        self._init_files(paths, max_bad_frac)
        self.labels, self.transform = np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        j, image = self._read(int(i))
        return (self.transform(image) if self.transform else image), int(self.labels[j])


class ArrayTrainSet(CaptionedTrainSet):
    """Training items from an in-memory uint8 array [N, H, W, 3] (CIFAR), images as PIL."""

    def __init__(self, array, labels, concepts, caption_args, transform, seed):
        super().__init__(labels, transform, seed)
        self.array, self.concepts, self.caption_args = array, concepts, caption_args

    def _image(self, i):
        from PIL import Image

        return Image.fromarray(self.array[i])

    def _caption(self, rng, i):
        return build_caption(rng, self.concepts[i], **self.caption_args)


class ArrayTestSet(Dataset):
    def __init__(self, array, labels, transform):
        self.array, self.labels, self.transform = array, np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        image = Image.fromarray(self.array[int(i)])
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def need_path(path, what):
    if not path:
        raise ValueError(f"{what} is required")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no such file or directory: {path}")
    return path


def _class_lookup(classnames, imagenet_ids, synonyms=None):
    """Folder-name / label-name key -> class index: wnids and ImageNet indices of ImageNet classes,
    class names and synonyms (lower-case)."""
    wnids = imagenet_wnids()
    key = {}
    for c, (name, iid) in enumerate(zip(classnames, imagenet_ids)):
        for s in (synonyms[c] if synonyms else [name]):
            key.setdefault(s.lower(), c)
        key[name.lower()] = c
        if iid >= 0:
            key[wnids[iid]] = c
    return key


def _image_folder(root):
    """[(folder name, [image paths])] of an ImageFolder layout root/<class>/<image>, sorted."""
    need_path(root, "image folder")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a folder (expected {root}/<class>/<image>)")
    out = []
    for d in sorted(os.listdir(root)):
        full = os.path.join(root, d)
        if os.path.isdir(full):
            files = []
            for dirpath, _, names in sorted(os.walk(full)):
                files += [os.path.join(dirpath, f) for f in sorted(names) if f.lower().endswith(IMG_EXTENSIONS)]
            out.append((d, files))
    if not out:
        raise ValueError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    return out


def eval_image_folder(root, classnames, imagenet_ids, transform, max_bad_frac=0.01):
    """An evaluation ImageFolder mapped onto the current classes. Folder names may be wnids (ImageNet
    val), ImageNet class indices 0..999 (ImageNet-V2's layout), class names or WordNet synonyms; folders
    of classes that are not evaluated are skipped (e.g. 1000-class ImageNet-V2 when evaluating
    ImageNet-100), and evaluated classes without a folder are named in a warning."""
    all_synonyms = imagenet_synonyms()
    synonyms = [all_synonyms[i] if i >= 0 else [name] for name, i in zip(classnames, imagenet_ids)]
    lookup = _class_lookup(classnames, imagenet_ids, synonyms)
    by_iid = {iid: c for c, iid in enumerate(imagenet_ids) if iid >= 0}
    paths, labels = [], []
    for folder, files in _image_folder(root):
        if folder.isdigit() and by_iid:
            c = by_iid.get(int(folder))
        else:
            c = lookup.get(folder) if folder in lookup else lookup.get(folder.lower().replace("_", " "))
        if c is None:
            continue
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise ValueError(f"{root}: no folder matches the {len(classnames)} evaluated classes "
                         f"(use wnids, ImageNet indices or class names as folder names)")
    absent = [classnames[c] for c in sorted(set(range(len(classnames))) - set(labels))]
    if absent:  # a spelling the lookup does not know would silently shrink the evaluation
        warnings.warn(f"{root}: {len(absent)} of the {len(classnames)} evaluated classes have no folder "
                      f"(e.g. {', '.join(absent[:3])}); they are left out of this evaluation")
    return FileTestSet(paths, labels, transform, max_bad_frac)


def _imagenet_concepts(ids):
    names, syns = imagenet_classnames(), imagenet_synonyms()
    return {i: Concept(names[i], syns[i], []) for i in ids}


def _real_test(opts, data_root, classnames, imagenet_ids, transform):
    val = opts.val_root or (os.path.join(data_root, "val") if data_root and os.path.isdir(os.path.join(data_root, "val")) else None)
    if not val and not opts.need_test:
        return None
    if not val:
        raise ValueError(f"--data {opts.data} needs a test set: --val-root DIR (ImageFolder, wnid folders)"
                         + (f" or {os.path.join(data_root, 'val')}" if data_root else ""))
    need_path(val, "--val-root")
    return eval_image_folder(val, classnames, imagenet_ids, transform, opts.max_bad_frac)


def _read_incaps_json(path):
    """ImageNet-Captions entries: a JSON list, or JSON Lines, of {wnid, filename, title, description,
    tags}. Returns [(where, entry)] with `where` naming the entry (line number for JSON Lines)."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})")
        rows = [(f"{path}: entry {k}", e) for k, e in enumerate(entries)]
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg})")
    for where, e in rows:
        if not isinstance(e, dict) or not isinstance(e.get("wnid"), str) or not isinstance(e.get("filename"), str):
            raise ValueError(f"{where}: expected an object with string 'wnid' and 'filename', got {str(e)[:80]!r}")
    return rows


def load_incaps(opts, train_transform, test_transform):
    """--data incaps --data-root DIR: DIR/imagenet_captions.json (or --train-file) and the ImageNet
    training images DIR/train/<wnid>/<filename>; test set from --val-root or DIR/val."""
    root = need_path(opts.data_root, "--data-root")
    json_path = need_path(opts.train_file or os.path.join(root, "imagenet_captions.json"), "ImageNet-Captions json")
    image_root = need_path(os.path.join(root, "train"), "ImageNet train folder")
    class_ids = select_classes(opts.classes)
    wnid_to_id = {w: i for i, w in enumerate(imagenet_wnids())}
    rows = _read_incaps_json(json_path)
    for where, e in rows:
        if e["wnid"] not in wnid_to_id:
            raise ValueError(f"{where}: unknown wnid {e['wnid']!r} (not an ImageNet-1k class)")
    present_others = sorted({wnid_to_id[e["wnid"]] for _, e in rows} - set(class_ids))
    if not 0 <= opts.open_world <= len(present_others):
        raise ValueError(f"--open-world must be in [0, {len(present_others)}] (other classes in {json_path})")
    rng = np.random.default_rng([opts.data_seed, 11])
    ow_ids = sorted(rng.choice(present_others, opts.open_world, replace=False).tolist()) if opts.open_world else []
    label_of = {c: k for k, c in enumerate(class_ids)}
    label_of.update({c: -1 for c in ow_ids})
    concept_of = _imagenet_concepts(class_ids + ow_ids)
    paths, labels, concepts, fields = [], [], [], []
    for _, e in rows:
        iid = wnid_to_id[e["wnid"]]
        if iid not in label_of:
            continue
        tags = e.get("tags") or []
        paths.append(os.path.join(image_root, e["wnid"], e["filename"]))
        labels.append(label_of[iid])
        concepts.append(concept_of[iid])
        fields.append(dict(title=str(e.get("title") or ""), description=str(e.get("description") or ""),
                           tags=" ".join(tags) if isinstance(tags, list) else str(tags)))
    if not paths:
        raise ValueError(f"{json_path}: no entry of the {len(class_ids)} classes of --classes {opts.classes}")
    size = opts.image_size or 224
    d_train, d_test = default_transforms(size, tensor_images=False)
    names, syns = imagenet_classnames(), imagenet_synonyms()
    classnames = [names[c] for c in class_ids]
    train = FileTrainSet(paths, labels, concepts, fields, caption_options(opts), train_transform or d_train,
                         opts.data_seed, opts.max_bad_frac)
    test = _real_test(opts, root, classnames, class_ids, test_transform or d_test)
    return LongTailData(classnames=classnames, synonyms=[syns[c] for c in class_ids], imagenet_ids=list(class_ids),
                        train_counts=label_counts(labels, len(class_ids)), train=train, test=test,
                        open_world_names=[names[c] for c in ow_ids], open_world_ids=list(ow_ids),
                        info=dict(data="incaps", json=json_path))


def label_counts(labels, num_classes):
    labels = np.asarray(labels, dtype=np.int64)
    return np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.int64)


def table_reader(f, path):
    """Rows of a .csv (comma-separated, "quoted" fields) or of a TSV, where a quote is just a character:
    web captions are full of them, and a quote that never closes would swallow the rest of the file."""
    import csv

    if path.lower().endswith(".csv"):
        return csv.reader(f)
    return csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)


def load_tsv(opts, train_transform, test_transform):
    """--data tsv --train-file F: header row with columns filepath, label, caption (tab-separated;
    a .csv file is comma-separated). label = index into the --classes list (for in1k: the ImageNet
    class index), a class name, a WordNet synonym of one class only, or a wnid. Relative file paths are
    relative to --data-root,
    else to the file's folder. Test set from --val-root."""
    path = need_path(opts.train_file, "--train-file")
    base = opts.data_root or os.path.dirname(os.path.abspath(path))
    class_ids = select_classes(opts.classes)
    names, syns = imagenet_classnames(), imagenet_synonyms()
    classnames, synonyms = [names[c] for c in class_ids], [syns[c] for c in class_ids]
    by_name = _class_lookup(classnames, class_ids, synonyms)  # names first, then synonyms, wnids
    shared = Counter(s.lower() for ss in synonyms for s in set(ss))
    ambiguous = {s for s, n in shared.items() if n > 1} - {name.lower() for name in classnames}
    concept_of = _imagenet_concepts(class_ids)
    paths, labels, captions = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM must not hide the header
        reader = table_reader(f, path)
        header = next(reader, None)
        cols = [h.strip().lower() for h in header] if header else []
        if not {"filepath", "label", "caption"} <= set(cols):
            raise ValueError(f"{path}:1: the header must name the columns filepath, label, caption; got {header}")
        fp_col, lab_col, cap_col = cols.index("filepath"), cols.index("label"), cols.index("caption")
        for row in reader:
            lineno = reader.line_num
            if not row or not any(x.strip() for x in row):
                continue
            if len(row) != len(cols):
                raise ValueError(f"{path}:{lineno}: expected {len(cols)} columns ({', '.join(cols)}), got {len(row)}")
            raw = row[lab_col].strip()
            if re.fullmatch(r"-?\d+", raw):
                label = int(raw)
                if not 0 <= label < len(class_ids):
                    raise ValueError(f"{path}:{lineno}: label {label} outside the {len(class_ids)} classes of "
                                     f"--classes {opts.classes} (valid 0..{len(class_ids) - 1})")
            elif raw.lower() in ambiguous:
                raise ValueError(f"{path}:{lineno}: label {raw!r} is a synonym of several classes; use the class "
                                 "index or the class name")
            elif raw.lower() in by_name:
                label = by_name[raw.lower()]
            else:
                raise ValueError(f"{path}:{lineno}: label {raw!r} is not a class of --classes {opts.classes}")
            fp = row[fp_col].strip()
            if not fp:
                raise ValueError(f"{path}:{lineno}: empty filepath")
            paths.append(fp if os.path.isabs(fp) else os.path.join(base, fp))
            labels.append(label)
            captions.append(row[cap_col])
    if not paths:
        raise ValueError(f"{path}: no data rows")
    size = opts.image_size or 224
    d_train, d_test = default_transforms(size, tensor_images=False)
    train = FileTrainSet(paths, labels, [concept_of[class_ids[y]] for y in labels], captions, caption_options(opts),
                         train_transform or d_train, opts.data_seed, opts.max_bad_frac)
    test = _real_test(opts, opts.data_root, classnames, class_ids, test_transform or d_test)
    return LongTailData(classnames=classnames, synonyms=synonyms, imagenet_ids=list(class_ids),
                        train_counts=label_counts(labels, len(class_ids)), train=train, test=test,
                        info=dict(data="tsv", train_file=path))


def load_imagefolder(opts, train_transform, test_transform):
    """--data imagefolder --data-root DIR: training images DIR/train/<class>/* (or DIR/<class>/* when
    there is no train/ folder); test from --val-root or DIR/val. Classes are the training folders;
    wnid folder names get their ImageNet names, synonyms and ids (so the frozen heads apply)."""
    root = need_path(opts.data_root, "--data-root")
    train_root = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    folders = _image_folder(train_root)
    if train_root == root:  # DIR/<class>/* next to DIR/val: the held-out folders are not classes
        folders = [(name, files) for name, files in folders if name not in ("val", "test")]
    wnid_to_id = {w: i for i, w in enumerate(imagenet_wnids())}
    names, syns = imagenet_classnames(), imagenet_synonyms()
    classnames, synonyms, ids, paths, labels = [], [], [], [], []
    for c, (folder, files) in enumerate(folders):
        iid = wnid_to_id.get(folder, -1)
        classnames.append(names[iid] if iid >= 0 else folder.replace("_", " "))
        synonyms.append(syns[iid] if iid >= 0 else [classnames[-1]])
        ids.append(iid)
        paths += files
        labels += [c] * len(files)
    size = opts.image_size or 224
    d_train, d_test = default_transforms(size, tensor_images=False)
    concepts = [Concept(classnames[y], synonyms[y], []) for y in range(len(classnames))]
    train = FileTrainSet(paths, labels, [concepts[y] for y in labels], [None] * len(paths), caption_options(opts),
                         train_transform or d_train, opts.data_seed, opts.max_bad_frac)
    test = _real_test(opts, root, classnames, ids, test_transform or d_test)
    return LongTailData(classnames=classnames, synonyms=synonyms, imagenet_ids=ids,
                        train_counts=label_counts(labels, len(classnames)), train=train, test=test,
                        info=dict(data="imagefolder", root=train_root))


def cifar_lt_counts(imbalance, num_classes=100, n_max=500):
    """Exponential profile of CIFAR-100-LT (Cao et al., LDAM): n_c = n_max * imbalance^(-c/(C-1))."""
    return np.array([int(n_max * imbalance ** (-c / (num_classes - 1))) for c in range(num_classes)], dtype=np.int64)


def read_cifar100(root, split):
    """(images uint8 [N,32,32,3], fine labels [N], class names) from torchvision's CIFAR-100 files
    root/cifar-100-python/{train,test,meta} (python pickles). Read directly, without torchvision's md5
    check, so that re-packed copies (and the tests' small fixtures) load too."""
    import pickle

    folder = os.path.join(root, "cifar-100-python")
    out = []
    for name in (split, "meta"):
        path = need_path(os.path.join(folder, name), "CIFAR-100 file")
        try:
            with open(path, "rb") as f:
                out.append(pickle.load(f, encoding="latin1"))
        except Exception as e:
            raise ValueError(f"{path}: not a CIFAR-100 pickle ({type(e).__name__}: {e})")
    entry, meta = out
    try:
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
        names = list(meta["fine_label_names"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{folder}/{split}: malformed CIFAR-100 data ({type(e).__name__}: {e})")
    if len(labels) != len(images) or (len(labels) and not 0 <= labels.min() <= labels.max() < len(names)):
        raise ValueError(f"{folder}/{split}: {len(images)} images, {len(labels)} labels, labels outside 0..{len(names) - 1}")
    return np.ascontiguousarray(images), labels, names


def load_cifar100_lt(opts, train_transform, test_transform):
    """--data cifar100-lt --data-root DIR: torchvision's CIFAR-100 files (DIR/cifar-100-python/), never
    downloaded; the training set is cut to the exponential profile with --imbalance (a seeded choice
    of samples per class); the test set is CIFAR-100's balanced test split."""
    root = need_path(opts.data_root, "--data-root")
    if opts.imbalance < 1:
        raise ValueError(f"--imbalance must be >= 1, got {opts.imbalance}")
    train_images, targets, names = read_cifar100(root, "train")
    test_images, test_labels, _ = read_cifar100(root, "test")
    classnames = [c.replace("_", " ") for c in names]
    rng = np.random.default_rng([opts.data_seed, 13])
    counts = cifar_lt_counts(opts.imbalance, len(classnames), int(np.bincount(targets).max()))
    keep = np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:n] for c, n in enumerate(counts)])
    size = opts.image_size or 32
    d_train, d_test = default_transforms(size, tensor_images=False)
    concepts = [Concept(n, [n], []) for n in classnames]
    train = ArrayTrainSet(train_images[keep], targets[keep], [concepts[y] for y in targets[keep]],
                          caption_options(opts), train_transform or d_train, opts.data_seed)
    test = ArrayTestSet(test_images, test_labels, test_transform or d_test)
    return LongTailData(classnames=classnames, synonyms=[[n] for n in classnames], imagenet_ids=[-1] * len(classnames),
                        train_counts=label_counts(targets[keep], len(classnames)), train=train, test=test,
                        info=dict(data="cifar100-lt", imbalance=opts.imbalance))


# ---- Linear-probe transfer sets of Table 2 (Appx. D.3) ----------------------------------------------------

# Downstream sets transfer_splits reads (torchvision layouts), and each one's linear-probe metric
# (ssl-transfer's choices, which the paper's Table 2 follows; top-1 where not listed)
TRANSFER_SETS = ("cifar10", "cifar100", "dtd", "flowers102", "food101", "oxford_pets", "stanford_cars", "fgvc_aircraft",
                 "caltech101", "sun397", "voc2007", "birdsnap")
PROBE_METRICS = {"fgvc_aircraft": "mean_per_class", "caltech101": "mean_per_class", "flowers102": "mean_per_class",
                 "oxford_pets": "mean_per_class", "voc2007": "map11"}


def transfer_task_names(text, synthetic, root):
    """The linear-probe tasks of a --transfer list: the synthetic world's 'novel' and 'seen' (default with
    --data synthetic), or real sets (TRANSFER_SETS under `root`, or folder:PATH); 'none' = no probe."""
    text = text or ("novel,seen" if synthetic else "none")
    tasks = [] if text == "none" else [t.strip() for t in text.split(",") if t.strip()]
    if synthetic and root is not None:
        raise ValueError("--transfer-root holds real transfer sets, which need --data other than synthetic (the "
                         "synthetic world's tasks are novel and seen)")
    for task in tasks:
        if synthetic and task not in ("novel", "seen"):
            raise ValueError(f"--transfer {task}: a real data set needs --data other than synthetic (the synthetic "
                             "world's tasks are novel and seen)")
        if not synthetic and task in ("novel", "seen"):
            raise ValueError(f"--transfer {task}: a synthetic-world task needs --data synthetic")
        if not synthetic and not task.startswith("folder:"):
            if task not in TRANSFER_SETS:
                raise ValueError(f"--transfer {task}: unknown data set; use {', '.join(TRANSFER_SETS)} or folder:PATH")
            if root is None:
                raise ValueError(f"--transfer {task} needs --transfer-root (the folder holding {task}/)")
    return tasks


def check_transfer_folders(tasks, root, warn=True):
    """Every real transfer set's folder exists under `root` and its split files read: dino_tail.py checks this
    before pre-training. warn: say when a set without split files falls back to a seeded split."""
    for task in tasks:
        if task.startswith("folder:"):
            path = task[len("folder:"):]
            if not all(os.path.isdir(os.path.join(path, split)) for split in ("train", "test")):
                raise FileNotFoundError(f"--transfer {task}: expected ImageFolders {path}/train and {path}/test")
        elif task in TRANSFER_SETS and not os.path.isdir(os.path.join(root, task)):
            raise FileNotFoundError(f"--transfer {task}: no folder {os.path.join(root, task)}")
        elif task == "birdsnap":
            birdsnap_files(os.path.join(root, task))
        elif task in SPLIT_FILES and listed_split_files(task, os.path.join(root, task)):
            transfer_splits(task, root, None)  # reads the split files, checks their images
        elif task in SPLIT_FILES and warn:
            warnings.warn(f"--transfer {task}: no split files under {os.path.join(root, task)} "
                          f"({' or '.join(train for train, _ in SPLIT_FILES[task][1])}, ...): a seeded 80/20 split "
                          "of the whole set is used, so the score is not comparable with Table 2's")


def transfer_splits(name, root, transform):
    """(train, val or None, test) datasets of a downstream set found under root (never downloaded)."""
    from torchvision import datasets as D
    if name.startswith("folder:"):  # (check_transfer_folders found train/ and test/)
        path = name[len("folder:"):]
        split = lambda s: D.ImageFolder(os.path.join(path, s), transform) if os.path.isdir(os.path.join(path, s)) else None
        return split("train"), split("val"), split("test")
    where = os.path.join(root, name)
    kw = dict(root=where, transform=transform, download=False)
    if name in ("cifar10", "cifar100"):
        cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
        return cls(train=True, **kw), None, cls(train=False, **kw)
    if name in ("dtd", "flowers102", "fgvc_aircraft"):
        cls = {"dtd": D.DTD, "flowers102": D.Flowers102, "fgvc_aircraft": D.FGVCAircraft}[name]
        return cls(split="train", **kw), cls(split="val", **kw), cls(split="test", **kw)
    if name in ("food101", "stanford_cars"):
        cls = D.Food101 if name == "food101" else D.StanfordCars
        return cls(split="train", **kw), None, cls(split="test", **kw)
    if name == "oxford_pets":
        return D.OxfordIIITPet(split="trainval", **kw), None, D.OxfordIIITPet(split="test", **kw)
    if name == "voc2007":
        voc = lambda s: _MultiHotVOC(D.VOCDetection(root=where, year="2007", image_set=s, transform=transform))
        return voc("train"), voc("val"), voc("test")
    if name == "birdsnap":
        return birdsnap_splits(where, transform)
    if name in ("caltech101", "sun397"):
        listed = listed_split_files(name, where)
        if listed:  # ssl-transfer's splits, which Table 2 used
            image_root, train_file, test_file = listed
            read = read_caltech101_split if name == "caltech101" else read_sun397_split
            train_items, classes = read(train_file)
            test_items, _ = read(test_file, classes)
            return (_ListedImages(image_root, train_items, classes, transform), None,
                    _ListedImages(image_root, test_items, classes, transform))
        full = D.Caltech101(target_type="category", **kw) if name == "caltech101" else D.SUN397(**kw)
        tr, te = seeded_split(len(full), 0)
        return torch.utils.data.Subset(full, tr), None, torch.utils.data.Subset(full, te)
    raise AssertionError(f"--transfer {name}: not in TRANSFER_SETS")


# Caltech101 and SUN397 come without a train / test split in torchvision. ssl-transfer (whose protocol Table 2
# follows) reads split files: its caltech101-splits/{train,test}.txt ('Class/image_0001.jpg LABEL', the
# background class included; its readme puts them beside the images) and SUN397's official partition 01
# (Training_01.txt / Testing_01.txt, '/a/abbey/sun_x.jpg').
SPLIT_FILES = {  # NAME: (image folder, [(train file, test file), ...]), all under --transfer-root/NAME
    "caltech101": ("caltech101/101_ObjectCategories", [("caltech101-splits/train.txt", "caltech101-splits/test.txt"),
                                                        ("train.txt", "test.txt")]),
    "sun397": ("SUN397", [("Training_01.txt", "Testing_01.txt"), ("SUN397/Training_01.txt", "SUN397/Testing_01.txt")]),
}


def listed_split_files(name, where):
    """(image folder, train file, test file) under `where` if a pair of SPLIT_FILES exists there, else None."""
    images, pairs = SPLIT_FILES[name]
    for train, test in pairs:
        if os.path.isfile(os.path.join(where, train)) and os.path.isfile(os.path.join(where, test)):
            if not os.path.isdir(os.path.join(where, images)):
                raise FileNotFoundError(f"--transfer {name}: split files found but no image folder "
                                        f"{os.path.join(where, images)}")
            return os.path.join(where, images), os.path.join(where, train), os.path.join(where, test)
    return None


def _split_lines(path):
    """(line number, stripped line) of a split file's non-empty lines; an empty file is an error."""
    with open(path, encoding="utf-8-sig") as f:
        lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no images listed")
    return lines


def read_caltech101_split(path, classes=None):
    """ssl-transfer's 'Class/image_0001.jpg LABEL' lines -> ([(path, label)], class names by label). A label
    is named by its image folder; the test file must use the training file's label of every folder."""
    rows = []
    for number, line in _split_lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or "/" not in parts[0]:
            raise ValueError(f"{path}, line {number}: expected 'Class/image.jpg LABEL', got {line!r}")
        rows.append((parts[0], int(parts[1])))
    if classes is None:
        folder = {}
        for p, label in rows:
            if folder.setdefault(label, p.split("/")[0]) != p.split("/")[0]:
                raise ValueError(f"{path}: label {label} is used for folders {folder[label]} and {p.split('/')[0]}")
        classes = [folder.get(c, str(c)) for c in range(max(folder) + 1)]
    wrong = [(p, label) for p, label in rows if label >= len(classes) or classes[label] != p.split("/")[0]]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} lines disagree with the training file's labels, e.g. {wrong[0]}")
    return rows, classes


def read_sun397_split(path, classes=None):
    """SUN397 partition lines '/b/bakery/shop/sun_x.jpg' -> ([(path, label)], classes): the class is the
    line's folder ('bakery/shop'); labels index the training file's sorted classes."""
    rows = []
    for number, line in _split_lines(path):
        folder = os.path.dirname(line.lstrip("/"))
        if "/" not in folder:
            raise ValueError(f"{path}, line {number}: expected '/l/class/image.jpg', got {line!r}")
        rows.append((line.lstrip("/"), folder.split("/", 1)[1]))
    classes = classes or sorted({name for _, name in rows})
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted({name for _, name in rows} - set(index))
    if unknown:
        raise ValueError(f"{path}: classes {unknown[:3]} are not in the training split")
    return [(p, index[name]) for p, name in rows], classes


# Birdsnap has no torchvision reader. Its release (1.1) lists image URLs; its get_birdsnap.py fetches them into
# download/images/<Species>/<file>.jpg, and test_images.txt lists the test images ('Species/file.jpg' after a
# 'path' header). ssl-transfer, which Table 2 follows, trains on every other downloaded image.
def birdsnap_files(where):
    """(image folder, test list) of Birdsnap under `where`, or a FileNotFoundError naming what is missing."""
    images, listing = os.path.join(where, "download", "images"), os.path.join(where, "test_images.txt")
    for path, what, exists in ((listing, "file", os.path.isfile), (images, "folder", os.path.isdir)):
        if not exists(path):
            raise FileNotFoundError(f"--transfer birdsnap: no {what} {path} (expected Birdsnap 1.1's test_images.txt "
                                    "and its images fetched by get_birdsnap.py into download/images/<Species>/)")
    return images, listing


def birdsnap_splits(where, transform):
    """(train, None, test) of Birdsnap as ssl-transfer reads it: the listed images are the test set, every other
    downloaded image trains. Images are fetched from Flickr, so some listed ones are always missing: they are
    left out (as ssl-transfer does) and counted in a warning; a list that matches no image is an error."""
    from torchvision import datasets as D

    images, listing = birdsnap_files(where)
    listed = [line.lstrip("/") for _, line in _split_lines(listing)]
    if listed and "/" not in listed[0]:  # the 'path' header
        listed = listed[1:]
    listed = set(listed)
    full = D.ImageFolder(images, transform)
    in_test = np.array([os.path.relpath(path, images).replace(os.sep, "/") in listed for path, _ in full.samples])
    found = int(in_test.sum())
    if found == 0:
        raise ValueError(f"{listing}: none of its {len(listed)} test images is under {images}")
    if found < len(listed):
        warnings.warn(f"--transfer birdsnap: {len(listed) - found} of the {len(listed)} listed test images "
                      f"are not under {images} (never downloaded) and are left out")
    return (torch.utils.data.Subset(full, np.flatnonzero(~in_test).tolist()), None,
            torch.utils.data.Subset(full, np.flatnonzero(in_test).tolist()))


class _ListedImages(torch.utils.data.Dataset):
    """(image, label) of the files a split file lists, relative to `root`; a listed file that is missing is an
    error naming it (a split from another version of the set would silently shrink it otherwise)."""

    def __init__(self, root, items, classes, transform):
        missing = [p for p, _ in items if not os.path.isfile(os.path.join(root, p))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} listed images are not under {root}, e.g. {missing[0]}")
        self.root, self.items, self.classes, self.transform = root, items, classes, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(os.path.join(self.root, path)) as image:
            image = image.convert("RGB")
        return self.transform(image) if self.transform else image, label


class _MultiHotVOC(torch.utils.data.Dataset):
    """torchvision's VOCDetection as (image, 20-d multi-hot) items (VOC2007 classification)."""
    CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, target = self.base[i]
        objects = target["annotation"]["object"]
        hot = torch.zeros(len(self.CLASSES))
        for obj in objects if isinstance(objects, list) else [objects]:
            hot[self.CLASSES.index(obj["name"])] = 1
        return image, hot


def seeded_split(n, seed, fraction=0.2):
    """ssl-transfer's split: (the rest, a seeded 20 %) of n items, e.g. a training set and its validation set."""
    perm = np.random.default_rng([seed, 5]).permutation(n)
    cut = int(np.floor(fraction * n))
    return np.sort(perm[cut:]), np.sort(perm[:cut])
