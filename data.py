"""Everything the experiment scripts read: the synthetic long-tailed image-caption world (the embedded
default), real-data loaders with the same interface, caption formation (Sec. 3.2, Appx. C.2), class
frequencies (Appx. B.2) and dataset variants (Sec. 3.4-3.6, 4.1).

Scripts use two names:
    add_data_args(parser)                       # the shared --data ... flags
    data = load_data(args, train_transform, test_transform)   -> LongTailData
and read data.classnames, data.train (items: image, label, caption), data.test (items: image, label),
data.train_counts, ...  Labels index data.classnames; open-world samples (Sec. 3.6) carry label -1.

Also: frequency_profile(name, imagenet_ids), load_head(name_or_path, imagenet_ids),
estimate_class_frequency(captions, classnames, synonyms) and `python data.py count-freq FILE`.
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
METADATA_DIR = os.path.join(REPO_DIR, "metadata")
FREQ_DIR = os.path.join(METADATA_DIR, "freqs")
HEAD_DIR = os.path.join(METADATA_DIR, "heads")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip.constants.OPENAI_DATASET_STD
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "clip-beyond-tail")


# ============================================================================================
# ImageNet metadata: names, WordNet synonyms, ImageNet-100, frequency profiles, frozen heads
# ============================================================================================

_cache = {}


def _zero_shot_metadata():
    """open_clip's zero_shot_metadata module (ImageNet class names, the 80 CLIP templates), loaded from
    its file: it imports nothing, while `import open_clip` pulls in the whole model zoo (seconds)."""
    if "zsm" not in _cache:
        import importlib.util

        try:
            spec = importlib.util.find_spec("open_clip")
            path = os.path.join(os.path.dirname(spec.origin), "zero_shot_metadata.py")
            mod_spec = importlib.util.spec_from_file_location("_open_clip_zero_shot_metadata", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        except Exception:  # an unusual install: fall back to the normal import
            from open_clip import zero_shot_metadata as module
        _cache["zsm"] = module
    return _cache["zsm"]


def imagenet_classnames():
    """The 1,000 ImageNet class names (CLIP's curated names), in class-index order."""
    return list(_zero_shot_metadata().IMAGENET_CLASSNAMES)


def caption_templates():
    """The 80 CLIP prompt templates (callables name -> sentence)."""
    return list(_zero_shot_metadata().OPENAI_IMAGENET_TEMPLATES)


def _synsets():
    if "synsets" not in _cache:
        with open(os.path.join(METADATA_DIR, "imagenet_synsets.json")) as f:
            _cache["synsets"] = json.load(f)  # {wnid: [lemma, ...]} in class-index order
    return _cache["synsets"]


def imagenet_wnids():
    return list(_synsets().keys())


def imagenet_synonyms():
    """Per ImageNet class: [CLIP class name] + its WordNet lemmas (deduplicated, case-insensitive)."""
    if "synonyms" not in _cache:
        out = []
        for name, lemmas in zip(imagenet_classnames(), _synsets().values()):
            seen, syn = set(), []
            for s in [name] + list(lemmas):
                s = s.replace("_", " ").strip()
                if s and s.lower() not in seen:
                    seen.add(s.lower())
                    syn.append(s)
            out.append(syn)
        _cache["synonyms"] = out
    return [list(s) for s in _cache["synonyms"]]


def imagenet100_ids():
    """ImageNet-1k indices of the ImageNet-100 classes (Tian et al., CMC), as used for IN-Caps-100."""
    with open(os.path.join(METADATA_DIR, "imagenet100_idxs.txt")) as f:
        return [int(line) for line in f if line.strip()]


def select_classes(spec):
    """ImageNet-1k ids of a class subset: 'in100', 'in1k', 'rand<K>[:SEED]' (K random classes, sorted) or
    a comma-separated list of ImageNet indices (kept in its order: label k is the k-th).

    rand<K> is the draw of the authors' data_utils/create_incaps_subsets.py (numpy's legacy generator,
    np.random.seed(42); np.random.choice(1000, K, replace=False)), so their subsets' 0..K-1 labels name
    the same classes here; ':SEED' draws another subset the same way."""
    if spec == "in100":
        return imagenet100_ids()
    if spec == "in1k":
        return list(range(1000))
    m = re.fullmatch(r"rand(\d+)(?::(\d+))?", spec)
    if m and 2 <= int(m.group(1)) <= 1000:
        rng = np.random.RandomState(int(m.group(2) or 42))
        return sorted(rng.choice(1000, int(m.group(1)), replace=False).tolist())
    if re.fullmatch(r"\d+(,\d+)*", spec):
        ids = [int(i) for i in spec.split(",")]
        if max(ids) < 1000 and len(set(ids)) == len(ids) > 1:
            return ids
    raise ValueError(f"unknown class set {spec!r}: use in100, in1k, rand<K>[:SEED] with 2 <= K <= 1000, "
                     "or two or more distinct ImageNet indices 0-999 separated by commas")


def _profile_files():
    """Short profile name -> frequency table file in metadata/freqs.

    class_frequency_laionet_thresh0.7_frac0.5_ori.txt -> 'laionet-0.7-frac0.5';
    class_frequency_incaps_title_only_imagenet_ori.txt -> 'incaps-title-only'; etc.
    """
    files = {}
    for fn in sorted(os.listdir(FREQ_DIR)):
        m = re.fullmatch(r"class_frequency_(.+?)(_imagenet)?_ori\.txt", fn)
        if m:
            files[m.group(1).replace("_thresh", "-").replace("_", "-")] = fn
    files["laionet-match-incaps"] = files.get("laionet-match-incap")  # the '=freq' variant of Sec. 3.4
    return files


def profile_names():
    return sorted(_profile_files()) + ["uniform"]


def read_frequency_table(path):
    """A 'classname<TAB>count' table -> (names, counts float64)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"frequency table not found: {path}")
    names, counts = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").rsplit("\t", 1)
            try:
                counts.append(float(parts[1]))
                if not counts[-1] >= 0 or counts[-1] == math.inf:
                    raise ValueError
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{lineno}: expected 'classname<TAB>count' with a finite count >= 0, "
                                 f"got {line.strip()!r}") from None
            names.append(parts[0])
    if not any(c > 0 for c in counts):
        raise ValueError(f"frequency table {path} has no class with a positive count")
    return names, np.asarray(counts, dtype=np.float64)


def write_frequency_table(path, classnames, counts):
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(f"{name}\t{int(c)}\n" for name, c in zip(classnames, counts))
    atomic_write(path, write)


def profile_table_path(name):
    """The table file behind a frequency profile: a profile_names() entry or a table file (None for
    'uniform'). An unknown name is a ValueError, a missing file a FileNotFoundError: checkable up front."""
    if name == "uniform":
        return None
    files = _profile_files()
    if files.get(name):
        return os.path.join(FREQ_DIR, files[name])
    if os.path.sep in name or name.endswith(".txt"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"frequency table not found: {name}")
        return name
    raise ValueError(f"unknown frequency profile {name!r}; choose one of: {', '.join(profile_names())} "
                     f"or give a table file")


def frequency_profile(name, imagenet_ids):
    """Per-class frequency of the given ImageNet classes under a named profile (see profile_names()),
    'uniform', or a table file (1,000 lines in ImageNet order, or one line per given class).
    For 'incaps' on a subset of ImageNet-100 the dedicated IN-Caps-100 table is used."""
    ids = list(imagenet_ids)
    path = profile_table_path(name)
    if path is None:
        return np.ones(len(ids))
    if name == "incaps" and ids and set(ids) <= set(imagenet100_ids()):
        pos = {c: i for i, c in enumerate(imagenet100_ids())}
        _, counts = read_frequency_table(os.path.join(FREQ_DIR, _profile_files()["incaps-imagenet100"]))
        return counts[[pos[c] for c in ids]]
    _, counts = read_frequency_table(path)
    if len(counts) == len(ids):
        return counts
    if len(counts) == 1000 and all(0 <= c < 1000 for c in ids):
        return counts[ids]
    raise ValueError(f"frequency table {path} has {len(counts)} rows; expected 1000 or {len(ids)}")


HEADS = {
    "clip-rn50": "in1k_clip_rn50_wit400m_a+cname.pt",
    "openclip-vitb32-laion400m": "in1k_openclip_vitb32_laion400m_a+cname.pt",
    "roberta": "in1k_roberta_a+cname.pt",
}


def load_head(name_or_path, imagenet_ids, classnames=None):
    """Frozen class prototypes [C, D] float32 (not normalised) for the given classes.

    name_or_path: a shipped head ('clip-rn50', 'openclip-vitb32-laion400m', 'roberta'; text embeddings of
    "a {classname}", Sec. 4.1 / Appx. C.4) or a file holding a [C, D] or [1000, D] tensor, or a dict with
    'prototypes' (and optional 'classnames', used to pick rows by name when `classnames` is given)."""
    path = os.path.join(HEAD_DIR, HEADS[name_or_path]) if name_or_path in HEADS else name_or_path
    if not os.path.exists(path):
        raise FileNotFoundError(f"head not found: {path} (shipped heads: {', '.join(HEADS)})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, a pickle of other objects, truncated: say which file
        raise ValueError(f"cannot read head file {path}: {str(e).splitlines()[0]}") from None
    names = None
    if isinstance(obj, dict):
        if "prototypes" not in obj:
            raise ValueError(f"head file {path}: a dict needs a 'prototypes' key, has {sorted(obj)}")
        names, obj = obj.get("classnames"), obj["prototypes"]
    if not torch.is_tensor(obj) or obj.dim() != 2:
        raise ValueError(f"head file {path}: expected a 2-d tensor [classes, dim], got "
                         f"{getattr(obj, 'shape', type(obj).__name__)}")
    w = obj.float()
    ids = list(imagenet_ids)
    if names is not None and classnames is not None and len(names) == w.shape[0]:
        pos = {n: i for i, n in enumerate(names)}
        missing = [n for n in classnames if n not in pos]
        if missing:
            raise ValueError(f"head file {path}: classes missing from its 'classnames': {missing[:5]}")
        return w[[pos[n] for n in classnames]].contiguous()
    if w.shape[0] == len(ids):
        return w.contiguous()
    if w.shape[0] == 1000 and ids and all(0 <= i < 1000 for i in ids):
        return w[ids].contiguous()
    raise ValueError(f"head file {path} has {w.shape[0]} classes; the data has {len(ids)} classes "
                     f"(a 1000-row ImageNet head needs ImageNet class ids)")


def _embeddings(head, n_components=None):
    """Centred, l2-normalised text embeddings of the 1,000 ImageNet classes [1000, D] float64.
    Centring removes the direction shared by all prompts "a {classname}" so that cosine similarity
    shows the semantic structure. With n_components, the embeddings are first projected on their top
    principal components, where the category structure lives: for the OpenCLIP ViT-B/32 head and 32
    components, an ImageNet-100 class's nearest neighbour has cosine ~0.65 (Shih Tzu -> Chihuahua,
    cabbage -> cauliflower) and two random classes ~0 +- 0.22 (full dimension: 0.34 and 0 +- 0.10)."""
    key = ("emb", head, n_components)
    if key not in _cache:
        e = load_head(head, list(range(1000))).double()
        e = e - e.mean(0, keepdim=True)
        if n_components:
            e = e @ torch.linalg.svd(e, full_matrices=False).Vh[:n_components].T
        _cache[key] = e / e.norm(dim=1, keepdim=True)
    return _cache[key]


# ============================================================================================
# The synthetic world (DESIGN.md, "The embedded default")
# ============================================================================================
#
# A sample of ImageNet class c is rendered from a semantic vector e_i = (e_c + diversity * xi) /
# sqrt(1 + diversity^2) (e_c: the class's CLIP text embedding, centred, on its top 32 principal
# components, unit norm; xi: a random direction of norm ~1), so its cosine to the class definition is
# ~1/sqrt(1 + diversity^2): the analogue of LAIONet's text-definition similarity threshold (lower
# threshold = more diverse images, Sec. 3.4). A fixed random linear map turns e_i (plus a smaller
# per-class random "detail" vector) into appearance coefficients: object colour, background context
# colour, a coarse colour layout, the amplitudes of oriented colour gratings (a texture "spectrum" a
# CNN reads regardless of position) and a silhouette. Similar embeddings therefore give similar
# images (dog breeds alike, dog vs volcano different). Per-sample nuisance: grating phases, position,
# scale, rotation, flip, colour jitter, background clutter made of other ImageNet classes' objects,
# pixel noise.

WORLD_VERSION = 2
SEMANTIC_DIM = 32                          # principal components of the text embeddings used
N_LAYOUT, N_GRATING, N_SHAPE = 12, 24, 12  # coarse colour fields, texture gratings, silhouette fields
N_COEF = 3 + 3 + N_LAYOUT + N_GRATING + N_SHAPE
RENDER_CHUNK = 2048
PALETTE = {  # colour words for descriptions, matched to the rendered object's mean colour
    "red": (0.8, 0.15, 0.15), "orange": (0.9, 0.5, 0.1), "yellow": (0.9, 0.85, 0.25),
    "green": (0.25, 0.6, 0.25), "blue": (0.2, 0.35, 0.8), "purple": (0.5, 0.25, 0.6),
    "pink": (0.95, 0.6, 0.7), "brown": (0.45, 0.3, 0.15), "black": (0.1, 0.1, 0.1),
    "white": (0.92, 0.92, 0.92), "gray": (0.5, 0.5, 0.5),
}
POSITIONS = ["in the centre", "on the left", "on the right", "at the top", "at the bottom"]
SIZES = ["small", "", "large"]


@dataclass(frozen=True)
class WorldSpec:
    """Every parameter the rendered pixels depend on; its hash names the cache file."""
    class_ids: tuple          # ImageNet ids of the evaluated classes
    train_counts: tuple       # training samples per evaluated class
    open_world_ids: tuple     # ImageNet ids of open-world concepts (label -1)
    open_world_counts: tuple
    num_test_per_class: int
    image_size: int
    diversity: float
    detail: float
    clutter: float
    noise: float
    head: str
    seed: int
    version: int = WORLD_VERSION

    def key(self):
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


def _generator(*seed):
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0] >> 1))
    return g


def _upsample_matrix(channels, cells, size):
    """The linear map [channels*cells*cells, channels*size*size] of bicubic upsampling: smooth random
    fields are random cells x cells grids pushed through it (a matmul: fast, and rendered at 32 or 64 px
    from the same grid, so both sizes show one world)."""
    eye = torch.eye(channels * cells * cells, dtype=torch.float64).view(-1, channels, cells, cells)
    return F.interpolate(eye, size=(size, size), mode="bicubic", align_corners=False).flatten(1)


def _smooth_basis(gen, n_fields, channels, cells, size):
    """n_fields fixed random smooth patterns [n_fields, channels*size*size] (float32), each of unit std."""
    up = _upsample_matrix(channels, cells, size)
    fields = torch.randn(n_fields, up.shape[0], generator=gen, dtype=torch.float64) @ up
    return (fields / fields.std(dim=1, keepdim=True).clamp_min(1e-6)).float()


def _grating_basis(gen, n, size):
    """n oriented colour gratings as [2n, 3*size*size] (cos rows, then sin rows): random direction,
    1.5-5 cycles across the frame, random colour direction. A sample mixes them with its own phases."""
    theta = torch.rand(n, generator=gen, dtype=torch.float64) * math.pi
    freq = 1.5 + 3.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    colour = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    colour = colour / colour.norm(dim=1, keepdim=True)
    lin = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    arg = math.pi * freq[:, None, None] * (torch.cos(theta)[:, None, None] * xx + torch.sin(theta)[:, None, None] * yy)
    waves = torch.cat([torch.cos(arg), torch.sin(arg)])                       # [2n, S, S]
    rgb = torch.cat([colour, colour])[:, :, None, None] * waves[:, None]      # [2n, 3, S, S]
    return rgb.flatten(1).float()


class _Appearance:
    """The fixed random maps from semantic vectors to appearance (depend on seed, head, size only)."""

    def __init__(self, head, seed, size):
        emb = _embeddings(head, SEMANTIC_DIM)
        g = _generator(seed, 101)
        self.size = size
        self.layout_basis = _smooth_basis(g, N_LAYOUT, 3, 3, size)
        self.grating_basis = _grating_basis(g, N_GRATING, size)
        self.shape_basis = _smooth_basis(g, N_SHAPE, 1, 3, size)
        up = _upsample_matrix(3, 4, size)  # backgrounds: per-sample random 3x4x4 grids, upsampled
        self.background_basis = (up / up.pow(2).sum(0).mean().sqrt()).float()
        # e -> [colour(3) | context(3) | layout | grating amplitudes | shape]; unit-variance entries
        self.lin_map = torch.randn(SEMANTIC_DIM, N_COEF, generator=g, dtype=torch.float64)
        self.class_emb = emb
        self.class_detail = torch.randn(1000, N_COEF, generator=g, dtype=torch.float64)
        lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        self.r2 = xx ** 2 + yy ** 2

    def coefficients(self, ids, diversity, detail, gen):
        """Appearance coefficients [n, N_COEF] (float32) of n samples of ImageNet classes `ids`: the
        map of e_i = (e_c + diversity * xi) / sqrt(1 + diversity^2), plus the class's detail vector."""
        xi = torch.randn(len(ids), SEMANTIC_DIM, generator=gen, dtype=torch.float64) / math.sqrt(SEMANTIC_DIM)
        e = (self.class_emb[ids] + diversity * xi) / math.sqrt(1 + diversity ** 2)
        return (e @ self.lin_map + detail * self.class_detail[ids]).float()

    def background(self, n, gen):
        """Smooth random backgrounds [n, 3, S, S] (unit-ish std, zero mean)."""
        x = torch.randn(n, self.background_basis.shape[0], generator=gen) @ self.background_basis
        return x.view(n, 3, self.size, self.size)

    def objects(self, coef, gen):
        """RGBA object images [n, 4, S, S] from coefficients; grating phases are random per sample."""
        n, s = coef.shape[0], self.size
        colour, layout = coef[:, 0:3], coef[:, 6:6 + N_LAYOUT]
        amp = F.softplus(2 * coef[:, 6 + N_LAYOUT:6 + N_LAYOUT + N_GRATING] - 1)  # a few dominant gratings
        shape = coef[:, 6 + N_LAYOUT + N_GRATING:]
        phase = torch.rand(n, N_GRATING, generator=gen) * (2 * math.pi)
        waves = torch.cat([amp * torch.cos(phase), -amp * torch.sin(phase)], 1) @ self.grating_basis
        tex = 0.5 * (layout @ self.layout_basis) / math.sqrt(N_LAYOUT) + 1.2 * waves / math.sqrt(N_GRATING)
        rgb = torch.sigmoid(1.2 * colour[:, :, None, None] + tex.view(n, 3, s, s))
        sil = (shape @ self.shape_basis).view(n, 1, s, s) / math.sqrt(N_SHAPE)
        alpha = torch.sigmoid(8.0 * (0.45 * sil + 1.0 - self.r2 / 0.6))
        return torch.cat([rgb, alpha], 1)


def _place(obj, scale, shift, angle, flip):
    """Affine-warp RGBA objects into the frame: object centre at `shift` (x, y in [-1, 1]), size
    `scale` of the frame, rotated by `angle`, mirrored where flip = -1. Outside the object alpha = 0."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    a = torch.stack([torch.stack([cos * flip, -sin * flip], 1), torch.stack([sin, cos], 1)], 1)
    t = -(a @ shift.unsqueeze(2))
    grid = F.affine_grid(torch.cat([a, t], 2), list(obj.shape), align_corners=False)
    return F.grid_sample(obj, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _composite(base, layer):
    return torch.lerp(base, layer[:, :3], layer[:, 3:4])


def _nearest_colour(rgb):
    pal = torch.tensor(list(PALETTE.values()), dtype=rgb.dtype)
    return torch.cdist(rgb, pal).argmin(1)


def _render(app, ids, spec, gen):
    """Render samples of ImageNet classes `ids` (LongTensor [n]) -> uint8 images [n,3,S,S] and
    caption attributes (colour, position, size, background colour) and clutter ids [n,2]."""
    n, s = len(ids), spec.image_size
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    # per-sample nuisance, drawn up front (small arrays)
    scale = 0.6 + 0.4 * u(n)
    shift = (u(n, 2) * 2 - 1) * 0.3
    angle = (u(n) * 2 - 1) * 0.4
    flip = torch.where(u(n) < 0.5, -1.0, 1.0)
    n_clutter = (u(n, 2) < torch.tensor([spec.clutter, spec.clutter / 2])).sum(1)
    clutter_ids = torch.randint(0, 1000, (n, 2), generator=gen)
    clutter_ids[n_clutter < 1, 0] = -1
    clutter_ids[n_clutter < 2, 1] = -1
    clutter_scale = 0.25 + 0.2 * u(n, 2)
    clutter_shift = (u(n, 2, 2) * 2 - 1) * 0.7
    clutter_angle = (u(n, 2) * 2 - 1) * 3.14
    contrast = 0.7 + 0.6 * u(n)
    brightness = (u(n) * 2 - 1) * 0.15
    gain = 0.85 + 0.3 * u(n, 3)
    images = torch.empty(n, 3, s, s, dtype=torch.uint8)
    colour_word = torch.empty(n, dtype=torch.long)
    bg_word = torch.empty(n, dtype=torch.long)
    chunk = RENDER_CHUNK * 32 * 32 // (s * s)  # ~2048 images of 32 px: intermediates stay in cache
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        m = sl.stop - sl.start
        coef = app.coefficients(ids[sl], spec.diversity, spec.detail, gen)
        # background: class context colour (fish -> water-like) + smooth per-sample variation
        ctx = 0.8 * coef[:, 3:6] + 0.8 * torch.randn(m, 3, generator=gen)
        img = torch.sigmoid(ctx[:, :, None, None] + 0.8 * app.background(m, gen))
        bg_word[sl] = _nearest_colour(img.mean((2, 3)))
        # clutter: small objects of random ImageNet classes behind the main object
        for k in range(2):
            cid = clutter_ids[sl, k]
            on = (cid >= 0).nonzero().squeeze(1)
            if len(on):
                cobj = app.objects(app.coefficients(cid[on], spec.diversity, spec.detail, gen), gen)
                cobj = _place(cobj, clutter_scale[sl][on, k], clutter_shift[sl][on, k],
                              clutter_angle[sl][on, k], torch.ones(len(on)))
                img[on] = _composite(img[on], cobj)
        obj = _place(app.objects(coef, gen), scale[sl], shift[sl], angle[sl], flip[sl])
        img = _composite(img, obj)
        # colour jitter (contrast, brightness, per-channel gain) and pixel noise
        mean = img.mean((1, 2, 3), keepdim=True)
        img = ((img - mean) * contrast[sl].view(m, 1, 1, 1) + mean + brightness[sl].view(m, 1, 1, 1))
        img = img * gain[sl].view(m, 3, 1, 1)
        img = img + spec.noise * torch.randn(img.shape, generator=gen)
        img = img.clamp(0, 1)
        a = obj[:, 3:4]
        colour_word[sl] = _nearest_colour((img * a).sum((2, 3)) / a.sum((2, 3)).clamp_min(1e-6))
        images[sl] = (img * 255).round().to(torch.uint8)
    # position / size words for descriptions (x: -1 left, y: -1 top)
    pos = torch.zeros(n, dtype=torch.long)
    off = shift.abs().max(1).values > 0.12
    horiz = shift[:, 0].abs() >= shift[:, 1].abs()
    pos[off & horiz & (shift[:, 0] < 0)] = 1
    pos[off & horiz & (shift[:, 0] >= 0)] = 2
    pos[off & ~horiz & (shift[:, 1] < 0)] = 3
    pos[off & ~horiz & (shift[:, 1] >= 0)] = 4
    size = (scale > 0.72).long() + (scale > 0.9).long()
    attrs = torch.stack([colour_word, pos, size, bg_word], 1)
    return images, attrs, clutter_ids


def build_world(spec, cache_dir=None):
    """Render (or load from the cache) the world described by `spec`.

    Returns a dict of tensors: train_images uint8 [N,3,S,S], train_concepts (ImageNet id of each
    sample's concept), train_attrs [N,4], train_clutter [N,2], test_images, test_concepts.
    Training samples are ordered class by class, then open-world concepts."""
    path = None
    if cache_dir:
        path = os.path.join(os.path.expanduser(cache_dir), f"world-{spec.key()}.pt")
        if os.path.exists(path):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file: re-render
                warnings.warn(f"ignoring unreadable world cache {path}: {e}")
    ids = list(spec.class_ids) + list(spec.open_world_ids)
    counts = list(spec.train_counts) + list(spec.open_world_counts)
    train_concepts = torch.tensor(np.repeat(ids, counts), dtype=torch.long)
    test_concepts = torch.tensor(np.repeat(spec.class_ids, spec.num_test_per_class), dtype=torch.long)
    # One thread: the pixels must not depend on the caller's thread count (torchrun sets 1, a plain run
    # several; a float32 reduction split differently could flip a rounding), and on a shared CPU one
    # thread is also the fastest here (~3 s for 20k images of 32 px).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        app = _Appearance(spec.head, spec.seed, spec.image_size)
        # separate streams: the test split does not depend on the training counts or profile
        tr_images, tr_attrs, tr_clutter = _render(app, train_concepts, spec, _generator(spec.seed, 1))
        te_images, _, _ = _render(app, test_concepts, spec, _generator(spec.seed, 2))
    finally:
        torch.set_num_threads(threads)
    world = dict(train_images=tr_images, train_concepts=train_concepts, train_attrs=tr_attrs,
                 train_clutter=tr_clutter, test_images=te_images, test_concepts=test_concepts)
    if path:
        _cache_world(world, path)
    return world


def _cache_world(world, path):
    """The cache is an optimisation: a write that fails (disk full, read-only folder) is a warning."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(world, tmp))
    except OSError as e:
        warnings.warn(f"could not cache the synthetic world at {path} (it will be rendered again next time): {e}")


def scale_counts(profile, total):
    """Integer counts proportional to `profile` summing to `total` (largest remainders); zeros stay
    zero, and every class with a non-zero profile value gets at least one sample."""
    p = np.asarray(profile, dtype=np.float64)
    if total < (p > 0).sum():
        raise ValueError(f"--num-train {total} is smaller than the number of classes with data ({(p > 0).sum()})")
    raw = p / p.sum() * total
    counts = np.floor(raw).astype(np.int64)
    counts[(p > 0) & (counts == 0)] = 1
    rest = total - counts.sum()
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    order = order[p[order] > 0]
    i = 0
    while rest != 0:  # hand out (or take back) the remainder, one sample at a time
        c = order[i % len(order)]
        if rest > 0:
            counts[c] += 1
            rest -= 1
        elif counts[c] > 1:
            counts[c] -= 1
            rest += 1
        i += 1
    return counts


# ============================================================================================
# Captions (Sec. 3.2, Appx. C.2)
# ============================================================================================

UNRELATED_TAGS = ["nikon", "canon", "2008", "2011", "2013", "summer", "winter", "vacation", "travel",
                  "nature", "family", "friends", "flickr", "photo", "explore", "city", "holiday", "art",
                  "macro", "outdoor", "weekend", "sunset", "park", "home", "trip", "bokeh", "hdr"]
GENERIC_TITLES = ["IMG_{n}", "DSC{n}", "Untitled", "photo {n}", "Day {d}", "Summer {y}", "My trip {y}",
                  "Weekend", "Holiday snaps", "P{n}", "Home", "At the park", "Sunday afternoon"]
PLACES = ["the zoo", "home", "the park", "the lake", "the market", "the beach", "my garden", "work"]


@dataclass
class Concept:
    """What captions may say about a sample's concept."""
    name: str
    synonyms: list      # name first, then WordNet lemmas
    related: list       # names of the most similar ImageNet classes (by embedding)


def template_caption(rng, name):
    """One of the 80 CLIP templates filled with `name` (Sec. 3.2, template-based captions)."""
    templates = _zero_shot_metadata().OPENAI_IMAGENET_TEMPLATES
    return templates[int(rng.integers(len(templates)))](name)


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _mention(rng, concept, p_synonym=0.35):
    """The class name, or (with p_synonym) one of its other WordNet synonyms."""
    if len(concept.synonyms) > 1 and rng.random() < p_synonym:
        return _pick(rng, concept.synonyms[1:])
    return concept.name


def _title(rng, concept, clutter_names):
    r = rng.random()
    if r < 0.40:  # titles often miss the class: only 40% mention it
        return _pick(rng, ["{x}", "My {x}", "{x} at {p}", "A {x}", "{x}!", "The {x}"]).format(
            x=_mention(rng, concept), p=_pick(rng, PLACES))
    if r < 0.50 and clutter_names:  # ... or are about something else in the picture
        return f"{_pick(rng, clutter_names)} at {_pick(rng, PLACES)}"
    return _pick(rng, GENERIC_TITLES).format(n=int(rng.integers(1000, 99999)), d=int(rng.integers(1, 30)),
                                             y=int(rng.integers(2004, 2015)))


def _description(rng, concept, attrs, clutter_names):
    colour, position, size, background = attrs
    size_word = SIZES[size] + " " if SIZES[size] else ""
    r = rng.random()
    if r < 0.55:  # mention the class (or a synonym) with appearance words tied to the rendering
        what = _mention(rng, concept)
    elif r < 0.70 and concept.related:  # a related (similar) class's name: realistic confusion
        what = _pick(rng, concept.related)
    else:
        what = _pick(rng, ["thing", "animal or object", "one", "subject"])
    text = f"A {size_word}{colour} {what} {position}, {background} background."
    if clutter_names and rng.random() < 0.6:
        text += f" There is also a {_pick(rng, clutter_names)}."
    if rng.random() < 0.3:
        text += " " + _pick(rng, ["Taken with my new camera.", "Not the best shot.", "Love this one!",
                                  f"Seen at {_pick(rng, PLACES)}."])
    return text


def _tags(rng, concept, attrs, clutter_names, other_names):
    tags = [_pick(rng, UNRELATED_TAGS) for _ in range(int(rng.integers(2, 6)))]
    if rng.random() < 0.75:
        tags.append(concept.name)
    if len(concept.synonyms) > 1 and rng.random() < 0.35:
        tags.append(_pick(rng, concept.synonyms[1:]))
    if rng.random() < 0.3:
        tags.append(attrs[0])
    if clutter_names and rng.random() < 0.5:
        tags.append(_pick(rng, clutter_names))
    if rng.random() < 0.15:  # tags naming some other, absent class
        tags.append(_pick(rng, other_names))
    order = rng.permutation(len(tags))
    return " ".join(tags[i] for i in order)


CAPTION_FIELDS = ("title", "description", "tags")  # the paper's order (Appx. C.2)


def natural_caption(rng, concept, attrs, fields, clutter_names=(), other_names=()):
    """A synthetic IN-Caps-like caption: the chosen fields of title / description / tags, joined in the
    paper's order. More fields -> more descriptive (Fig. 3): the class is mentioned in ~40% of titles,
    ~55% of descriptions (plus ~15% naming a similar class instead) and ~75% of tag lists."""
    parts = []
    for f in CAPTION_FIELDS:
        if f in fields:
            if f == "title":
                parts.append(_title(rng, concept, list(clutter_names)))
            elif f == "description":
                parts.append(_description(rng, concept, attrs, list(clutter_names)))
            else:
                parts.append(_tags(rng, concept, attrs, list(clutter_names), list(other_names)))
    return " ".join(p for p in parts if p)


def build_caption(rng, concept, kind, fields=CAPTION_FIELDS, attrs=None, clutter_names=(), other_names=(),
                  class_prefix=False, real_fields=None):
    """The caption of one training sample (Sec. 3.2):
      template         - one of the 80 CLIP templates with the class name;
      template-synset  - a template with a random WordNet synonym of the class;
      natural          - title / description / tags (`fields`, joined in the paper's order): the real
                         fields when the data has them (`real_fields`), else synthetic ones from `attrs`.
    class_prefix prepends the class name ("{name}. {caption}")."""
    if kind == "template":
        caption = template_caption(rng, concept.name)
    elif kind == "template-synset":
        caption = template_caption(rng, _pick(rng, concept.synonyms))
    elif kind == "natural":
        if isinstance(real_fields, str):  # a data set with one caption per image (TSV)
            caption = real_fields
        elif real_fields is not None:
            caption = " ".join(real_fields[f] for f in CAPTION_FIELDS if f in fields and real_fields.get(f))
        else:
            caption = natural_caption(rng, concept, attrs, fields, clutter_names, other_names)
    else:
        raise ValueError(f"unknown caption kind {kind!r}: use template, template-synset or natural")
    return f"{concept.name}. {caption}" if class_prefix else caption


def _related_names(head, k=3):
    """Names of the k most similar ImageNet classes of each class (by centred text embedding)."""
    key = ("related", head, k)
    if key not in _cache:
        e = _embeddings(head)
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        names = imagenet_classnames()
        _cache[key] = [[names[j] for j in row] for row in sim.topk(k, dim=1).indices.tolist()]
    return _cache[key]


# ============================================================================================
# Datasets
# ============================================================================================

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


# ============================================================================================
# LongTailData and load_data
# ============================================================================================

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
    g.add_argument("--class-prefix", action="store_true", help="prepend the class name to every caption")
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


def _caption_args(opts):
    fields = tuple(f.strip() for f in opts.caption_fields.split(",") if f.strip())
    bad = [f for f in fields if f not in CAPTION_FIELDS]
    if bad or not fields:
        raise ValueError(f"--caption-fields: unknown field(s) {bad or fields}; use a subset of {','.join(CAPTION_FIELDS)}")
    return dict(kind=opts.captions, fields=fields, class_prefix=bool(opts.class_prefix))


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
    loaders = {"synthetic": _load_synthetic, "incaps": _load_incaps, "tsv": _load_tsv,
               "imagefolder": _load_imagefolder, "cifar100-lt": _load_cifar100_lt}
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
                              world["train_clutter"], _caption_args(opts), opts.world_head,
                              train_transform or default_train, opts.data_seed)
    test = TensorTestSet(world["test_images"], test_labels, test_transform or default_test)
    names, syns = imagenet_classnames(), imagenet_synonyms()
    data = LongTailData(classnames=[names[c] for c in class_ids], synonyms=[syns[c] for c in class_ids],
                        imagenet_ids=list(class_ids), train_counts=np.asarray(counts, dtype=np.int64),
                        train=train, test=test, open_world_names=[names[c] for c in ow_ids], open_world_ids=list(ow_ids),
                        info=dict(data="synthetic", world=spec.key(), profile=opts.profile))
    return data


# ============================================================================================
# Real data: ImageNet-Captions, TSV, ImageFolder, CIFAR-100-LT
# ============================================================================================

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


def _need_path(path, what):
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
    _need_path(root, "image folder")
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
    _need_path(val, "--val-root")
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


def _load_incaps(opts, train_transform, test_transform):
    """--data incaps --data-root DIR: DIR/imagenet_captions.json (or --train-file) and the ImageNet
    training images DIR/train/<wnid>/<filename>; test set from --val-root or DIR/val."""
    root = _need_path(opts.data_root, "--data-root")
    json_path = _need_path(opts.train_file or os.path.join(root, "imagenet_captions.json"), "ImageNet-Captions json")
    image_root = _need_path(os.path.join(root, "train"), "ImageNet train folder")
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
    train = FileTrainSet(paths, labels, concepts, fields, _caption_args(opts), train_transform or d_train,
                         opts.data_seed, opts.max_bad_frac)
    test = _real_test(opts, root, classnames, class_ids, test_transform or d_test)
    return LongTailData(classnames=classnames, synonyms=[syns[c] for c in class_ids], imagenet_ids=list(class_ids),
                        train_counts=_label_counts(labels, len(class_ids)), train=train, test=test,
                        open_world_names=[names[c] for c in ow_ids], open_world_ids=list(ow_ids),
                        info=dict(data="incaps", json=json_path))


def _label_counts(labels, num_classes):
    labels = np.asarray(labels, dtype=np.int64)
    return np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.int64)


def _table_reader(f, path):
    """Rows of a .csv (comma-separated, "quoted" fields) or of a TSV, where a quote is just a character:
    web captions are full of them, and a quote that never closes would swallow the rest of the file."""
    import csv

    if path.lower().endswith(".csv"):
        return csv.reader(f)
    return csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)


def _load_tsv(opts, train_transform, test_transform):
    """--data tsv --train-file F: header row with columns filepath, label, caption (tab-separated;
    a .csv file is comma-separated). label = index into the --classes list (for in1k: the ImageNet
    class index), a class name, a WordNet synonym of one class only, or a wnid. Relative file paths are
    relative to --data-root,
    else to the file's folder. Test set from --val-root."""
    path = _need_path(opts.train_file, "--train-file")
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
        reader = _table_reader(f, path)
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
    train = FileTrainSet(paths, labels, [concept_of[class_ids[y]] for y in labels], captions, _caption_args(opts),
                         train_transform or d_train, opts.data_seed, opts.max_bad_frac)
    test = _real_test(opts, opts.data_root, classnames, class_ids, test_transform or d_test)
    return LongTailData(classnames=classnames, synonyms=synonyms, imagenet_ids=list(class_ids),
                        train_counts=_label_counts(labels, len(class_ids)), train=train, test=test,
                        info=dict(data="tsv", train_file=path))


def _load_imagefolder(opts, train_transform, test_transform):
    """--data imagefolder --data-root DIR: training images DIR/train/<class>/* (or DIR/<class>/* when
    there is no train/ folder); test from --val-root or DIR/val. Classes are the training folders;
    wnid folder names get their ImageNet names, synonyms and ids (so the frozen heads apply)."""
    root = _need_path(opts.data_root, "--data-root")
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
    train = FileTrainSet(paths, labels, [concepts[y] for y in labels], [None] * len(paths), _caption_args(opts),
                         train_transform or d_train, opts.data_seed, opts.max_bad_frac)
    test = _real_test(opts, root, classnames, ids, test_transform or d_test)
    return LongTailData(classnames=classnames, synonyms=synonyms, imagenet_ids=ids,
                        train_counts=_label_counts(labels, len(classnames)), train=train, test=test,
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
        path = _need_path(os.path.join(folder, name), "CIFAR-100 file")
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


def _load_cifar100_lt(opts, train_transform, test_transform):
    """--data cifar100-lt --data-root DIR: torchvision's CIFAR-100 files (DIR/cifar-100-python/), never
    downloaded; the training set is cut to the exponential profile with --imbalance (a seeded choice
    of samples per class); the test set is CIFAR-100's balanced test split."""
    root = _need_path(opts.data_root, "--data-root")
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
                          _caption_args(opts), train_transform or d_train, opts.data_seed)
    test = ArrayTestSet(test_images, test_labels, test_transform or d_test)
    return LongTailData(classnames=classnames, synonyms=[[n] for n in classnames], imagenet_ids=[-1] * len(classnames),
                        train_counts=_label_counts(targets[keep], len(classnames)), train=train, test=test,
                        info=dict(data="cifar100-lt", imbalance=opts.imbalance))


# ============================================================================================
# Dataset variants (Sec. 3.4, 3.5, 4.1), deterministic from --data-seed
# ============================================================================================

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
        sub, tail = trim_tail(labels[idx], _label_counts(labels[idx], len(data.classnames)), opts.trim_tail,
                              opts.tail_shots, rng)
        idx = idx[sub]
    if len(idx) == len(labels) and tail is None:
        return data
    data.train = SubsetTrainSet(data.train, idx)
    data.train_counts = _label_counts(data.train.labels, len(data.classnames))
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


# ============================================================================================
# Class-frequency estimation over captions (Appx. B.2)
# ============================================================================================

_IRREGULAR_PLURALS = {"men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
                      "geese": "goose", "mice": "mouse", "lice": "louse", "oxen": "ox", "people": "person",
                      "dice": "die", "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf",
                      "cacti": "cactus", "fungi": "fungus", "octopi": "octopus", "indices": "index"}
_UNCHANGED = {"species", "series", "sheep", "deer", "fish", "moose", "bison", "swine", "aircraft", "news",
              "glasses", "pants", "jeans", "shorts", "scissors", "trousers"}


def lemmatize_noun(word):
    """A tiny noun lemmatiser (plural -> singular) standing in for WordNet's: irregular forms, then
    -ies -> -y, -ves -> -f, -(s|x|z|ch|sh)es -> drop 'es', -s -> drop 's' (not -ss/-us/-is)."""
    w = word.lower()
    if w in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[w]
    if w in _UNCHANGED or len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("ves"):
        return w[:-3] + "f"
    if w.endswith(("sses", "xes", "zes", "ches", "shes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def caption_words(text):
    """Lower-case, non-alphanumerics to spaces, nouns lemmatised: the set of words of a caption."""
    return {lemmatize_noun(w) for w in re.sub(r"[^0-9a-z]+", " ", text.lower()).split()}


def estimate_class_frequency(captions, classnames, synonyms, negatives=None):
    """Count the captions that mention each class (Appx. B.2): a caption matches a class when all the
    words of any of its synonyms occur in the caption (set-level, order-free, after lemmatising), and
    none of the class's negative words does. A caption may match several classes.

    negatives: {class index or class name: [words]} (words that signal a different sense, e.g. 'bird' for
    'crane' the machine; a caption with any word of a negative phrase is no match, as in the authors'
    script). Returns (counts int64 [C], matched class lists per caption)."""
    C = len(classnames)
    neg = [set() for _ in range(C)]
    name_pos = {n: c for c, n in enumerate(classnames)}
    for key, words in (negatives or {}).items():
        c = name_pos.get(key, key)
        if not isinstance(c, int) or not 0 <= c < C:
            raise ValueError(f"negatives: unknown class {key!r}")
        neg[c] = neg[c].union(*(caption_words(w) for w in words))
    # index every synonym by one of its words, so a caption only checks synonyms it might contain
    by_word = {}
    for c in range(C):
        for syn in set([classnames[c]] + list(synonyms[c])):
            words = frozenset(caption_words(syn))
            if words:
                by_word.setdefault(min(words), []).append((c, words))
    counts = np.zeros(C, dtype=np.int64)
    matches = []
    for text in captions:
        words = caption_words(text)
        found = set()
        for w in words:
            for c, syn_words in by_word.get(w, ()):
                if c not in found and syn_words <= words and not (neg[c] & words):
                    found.add(c)
        found = sorted(found)
        counts[found] += 1
        matches.append(found)
    return counts, matches


def _read_caption_file(path):
    """Captions from a text file (one a line), or from the 'caption' column of a .tsv/.csv with header."""
    _need_path(path, "caption file")
    if path.lower().endswith((".tsv", ".csv")):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = _table_reader(f, path)
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
        with open(_need_path(a.negatives, "--negatives")) as f:
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


# ==== Run plumbing shared by the experiment scripts ====
# Process groups, deterministic global batches, atomic checkpoints and the run directory. The three
# scripts share this so that two promises hold for all of them in the same way: N processes with the same
# global batch give the numbers one process gives (up to reduction order), and --resume continues
# exactly where an uninterrupted run would be.


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device="auto", amp=False):
    """One process, or one of N under torchrun: NCCL on GPUs, gloo on CPUs."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU")
    if amp and not use_cuda:
        raise ValueError("--amp needs a CUDA GPU (bfloat16 autocast)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world_size, local_rank, dev)


def check_batch_split(batch_size, dist):
    """The global batch splits evenly over the processes, at least 2 images each (BatchNorm's minimum)."""
    if batch_size % dist.world_size:
        raise ValueError(f"--batch-size {batch_size} is not divisible by the {dist.world_size} processes")
    if batch_size // dist.world_size < 2:
        raise ValueError(f"--batch-size {batch_size} leaves fewer than 2 images per process; BatchNorm needs 2")


def close_distributed():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients too: every rank's loss depends on the global sum."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class _AllReduceBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm over the global batch for CPU process groups (torch's SyncBatchNorm is GPU-only).

    Without it each rank would normalise with its own half-batch statistics, and a 2-process run would
    train a different model than the 1-process run with the same global batch.
    """

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:-1] / n
        centred = x - mean[None, :, None, None]
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        return out * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def sync_batchnorm(model, dist):
    """Make every BatchNorm normalise over the global batch when there are several processes."""
    if dist.world_size == 1:
        return model
    if dist.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            bn = _AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, device=child.running_mean.device,
                                       dtype=child.running_mean.dtype)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            sync_batchnorm(child, dist)
    return model


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of each global batch, from one permutation per epoch that every rank draws alike.

    Global batch t is perm[t*B:(t+1)*B] whatever the number of processes, and rank r takes its r-th
    contiguous slice, so the union over ranks is exactly the one-process batch. Incomplete last batches
    are dropped.
    """

    def __init__(self, indices, global_batch, dist, seed, epoch=0):
        if global_batch % dist.world_size:
            raise ValueError(f"--batch-size {global_batch} is not divisible by the {dist.world_size} processes")
        if len(indices) < global_batch:
            raise ValueError(f"--batch-size {global_batch} is larger than the {len(indices)} training samples")
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.global_batch, self.dist, self.seed, self.epoch = global_batch, dist, seed, epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.indices) // self.global_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = self.indices[torch.randperm(len(self.indices), generator=g)]
        local = self.global_batch // self.dist.world_size
        for t in range(len(self)):
            start = t * self.global_batch + self.dist.rank * local
            yield perm[start:start + local].tolist()


def train_loader(dataset, global_batch, dist, seed, epoch=0, workers=0, indices=None, collate_fn=None):
    """DataLoader over `indices` (default: all of `dataset`) yielding this rank's part of each global batch."""
    if indices is None:
        indices = range(len(dataset))
    sampler = GlobalBatchSampler(list(indices), global_batch, dist, seed, epoch)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                        collate_fn=collate_fn, persistent_workers=False,
                                        pin_memory=dist.device.type == "cuda")


def eval_loader(dataset, batch_size, dist, workers=0, collate_fn=None):
    """Loader over this rank's strided shard of `dataset`; `loader.shard` lists the dataset indices it covers."""
    shard = list(range(dist.rank, len(dataset), dist.world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size,
                                          shuffle=False, num_workers=workers, collate_fn=collate_fn,
                                          pin_memory=dist.device.type == "cuda")
    loader.shard = shard
    return loader


def all_gather_cat(tensor, dist):
    """Concatenate a tensor (any length along dim 0) from all ranks, in rank order, on every rank."""
    if dist.world_size == 1:
        return tensor
    device = dist.device if dist.device.type == "cuda" else torch.device("cpu")
    tensor = tensor.to(device).contiguous()
    n = torch.tensor([tensor.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.world_size)]
    torch.distributed.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def gather_eval(shard, dist, *tensors):
    """Gather per-sample eval tensors from every rank's shard and put them back in dataset order."""
    order = all_gather_cat(torch.as_tensor(shard, dtype=torch.long), dist).cpu()
    inverse = torch.argsort(order)
    return tuple(all_gather_cat(t, dist).cpu()[inverse] for t in tensors)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's GPU only: a resumed job may see fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_write(path, write):
    """write(tmp) into a fresh temporary file beside `path`, then rename it to `path`: a kill mid-write never
    leaves a torn file, and concurrent writers (other ranks, other hosts sharing the folder) never share a
    temporary name. The file gets the permissions a plain open() would give (mkstemp's are owner-only)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, state):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a torn or foreign file: say which one
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
    atomic_write(path, write)


def data_flag_names():
    """The dests of the shared data flags (add_data_args)."""
    return set(_data_flag_defaults())


def warn_changed_flags(saved, args, source, keys=None):
    """One stderr line per flag (of `keys`, default all) whose value differs from `saved`, the flags a run
    was started with (source names where they come from): a resumed or re-evaluated run silently uses
    what the flags say now, other data included."""
    now = json.loads(json.dumps(vars(args), default=str))  # as args.json holds them (tuples as lists, ...)
    keys = set(saved) & set(now) - {"resume", "eval_only", "checkpoint", "pretrained"} if keys is None else keys
    for key in sorted(k for k in keys if k in saved and k in now and saved[k] != now[k]):
        print(f"warning: --{key.replace('_', '-')} is {now[key]!r} now but was {saved[key]!r} in {source}",
              file=sys.stderr)


def check_run_folder(out, resume):
    """A folder that already holds a run (a checkpoint) is only reused with --resume."""
    if os.path.exists(os.path.join(out, "checkpoint.pt")) and not resume:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


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


def data_difference(saved, now):
    """How the data `now` differ from `saved` (two data_identity dicts), in words; None when they match."""
    names, saved_names = now["classnames"], saved["classnames"]
    ids, saved_ids = now["imagenet_ids"], saved["imagenet_ids"]
    if len(names) != len(saved_names):
        return f"other classes ({len(names)} now, {len(saved_names)} then)"
    i = next((i for i in range(len(names)) if names[i] != saved_names[i] or ids[i] != saved_ids[i]), None)
    if i is not None:
        if names[i] != saved_names[i]:
            return f"other classes (class {i} is {names[i]!r} now, {saved_names[i]!r} then)"
        return f"other classes (class {i}, {names[i]!r}, has ImageNet id {ids[i]} now, {saved_ids[i]} then)"
    if saved["num_train"] != now["num_train"]:
        return f"another training set ({now['num_train']} images now, {saved['num_train']} then)"
    if saved["train_sha1"] != now["train_sha1"]:
        return (f"another training set (as many images, {now['num_train']}, but other samples, labels or data "
                "seed)")
    return None


class RunDir:
    """runs/<name>/: args.json, log.jsonl (one line per epoch), checkpoint.pt; rank 0 writes.

    A directory that already holds a checkpoint is only reused with --resume, so a typo in --out never
    overwrites a finished run. Given the run's data, checkpoints record data_identity(data) and a resume on
    other data is refused.
    """

    def __init__(self, out, args, dist, resume=False, data=None):
        self.out, self.dist = out, dist
        self.identity = None if data is None else data_identity(data)
        self.checkpoint = os.path.join(out, "checkpoint.pt")
        self.log_path = os.path.join(out, "log.jsonl")
        check_run_folder(out, resume)
        self.args_path, self.args = os.path.join(out, "args.json"), dict(vars(args))
        # a run to resume keeps its args.json until resume_state has checked that the data match
        self.args_pending = bool(resume and os.path.exists(self.checkpoint))
        if dist.is_main:
            os.makedirs(out, exist_ok=True)
            if self.args_pending and os.path.exists(self.args_path):
                with open(self.args_path) as f:
                    warn_changed_flags(json.load(f), args, self.args_path)
            if not self.args_pending:
                write_json(self.args_path, self.args)

    def resume_state(self, map_location="cpu"):
        """The saved state if there is one (else None); log lines past the saved epoch are dropped."""
        if not os.path.exists(self.checkpoint):
            if self.dist.is_main:
                print(f"--resume: no checkpoint in {self.out}; starting a new run", file=sys.stderr)
            return None
        state = load_checkpoint(self.checkpoint, map_location)
        saved = state.get("data") if isinstance(state, dict) else None
        difference = data_difference(saved, self.identity) if saved and self.identity else None
        if difference:
            raise ValueError(f"cannot resume {self.out}: its checkpoint was trained on {difference}; resume with "
                             "the data flags and folders it started with, or choose another --out")
        if self.dist.is_main and self.args_pending:
            write_json(self.args_path, self.args)
            self.args_pending = False
        if self.dist.is_main and os.path.exists(self.log_path):
            with open(self.log_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["epoch"] < state["epoch"]]
            atomic_write(self.log_path, lambda tmp: open(tmp, "w").writelines(kept))
        return state

    def save(self, state):
        if self.dist.is_main:
            save_checkpoint(self.checkpoint, state if self.identity is None else {**state, "data": self.identity})
        if self.dist.world_size > 1:
            torch.distributed.barrier()

    def log_epoch(self, record):
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")


def check_finite(loss, epoch, step):
    """Stop on a NaN/inf loss before the optimizer step can spoil the weights (the last checkpoint stays)."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch} step {step}; the last good "
                                 "checkpoint is kept, lower --lr or check the data")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' error style: one line naming the problem, exit status 2 (argparse's own
    adds the whole usage text, which buries the message). No flag takes nan or inf: they would only show
    up as a nan loss, after training has started."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for key, value in vars(parsed).items():
            if isinstance(value, float) and not math.isfinite(value):
                self.error(f"--{key.replace('_', '-')} must be a finite number, got {value}")
        return parsed


def _out_of_memory(error):
    """Whether `error` (a MemoryError or RuntimeError) says that memory ran out: CUDA, the CPU allocator or
    numpy."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return "can't allocate memory" in text or "not enough memory" in text


def run_cli(main):
    """Run a script's main(); bad input (ValueError, FileNotFoundError, NaN loss) ends in one line, exit 2,
    and running out of memory (a batch, image or model too large for the machine) in one line, exit 1.

    Set CLIP_TAIL_DEBUG=1 to see the full traceback instead.
    """
    program = os.path.basename(sys.argv[0])
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: a path that is a file, unwritable, ...
        if os.environ.get("CLIP_TAIL_DEBUG"):
            raise
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its own message is the last line
            message = message.splitlines()[-1].split(": ", 1)[-1]
        print(f"{program}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        if os.environ.get("CLIP_TAIL_DEBUG") or not _out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"{program}: error: out of memory ({first}); lower --batch-size (it is global: more processes "
              "share it) or the image or model size", file=sys.stderr)
        sys.exit(1)
    finally:
        close_distributed()

if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "count-freq":
        run_cli(lambda: count_freq_main(sys.argv[2:]))
    else:
        sys.exit("usage: python data.py count-freq FILE --classes in100|in1k [--negatives paper|none|JSON] [--out F]")
