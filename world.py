"""The embedded default: a synthetic long-tailed image-caption world (DESIGN.md, "The embedded default").

No data set can be downloaded on the machines this toolkit is developed on, so it renders one,
deterministically, in seconds: samples of real ImageNet classes whose appearance is derived from the
classes' CLIP text embeddings (semantically close classes look alike), with per-sample nuisance, and
captions in the paper's kinds (Sec. 3.2, Appx. C.2): CLIP templates, or IN-Caps-like title /
description / tags with realistic noise. It models the paper's preconditions -- class frequency,
semantic similarity, caption descriptiveness, intra-class diversity, open-world concepts -- and nothing
of its answers.

    world = build_world(WorldSpec(...), cache_dir)   -> images, concepts, caption attributes (tensors)
    build_caption(rng, concept, kind, fields, attrs) -> one caption
data.load_data(--data synthetic) turns these into datasets.
"""
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from classes import _embeddings, _zero_shot_metadata, imagenet_classnames
from runtime import atomic_write

_cache = {}

# How a sample looks. A sample of ImageNet class c is rendered from a semantic vector
# e_i = (e_c + diversity * xi) / sqrt(1 + diversity^2) (e_c: the class's CLIP text embedding, centred, on
# its top 32 principal components, unit norm; xi: a random direction of norm ~1), so its cosine to the
# class definition is ~1/sqrt(1 + diversity^2): the analogue of LAIONet's text-definition similarity
# threshold (lower threshold = more diverse images, Sec. 3.4). A fixed random linear map turns e_i (plus a
# smaller per-class random "detail" vector) into appearance coefficients: object colour, background
# context colour, a coarse colour layout, the amplitudes of oriented colour gratings (a texture "spectrum"
# a CNN reads regardless of position) and a silhouette. Similar embeddings therefore give similar images
# (dog breeds alike, dog vs volcano different). Per-sample nuisance: grating phases, position, scale,
# rotation, flip, colour jitter, background clutter made of other ImageNet classes' objects, pixel noise.

WORLD_VERSION = 3
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
    """n oriented gratings as [2n, 3*size*size] (cos rows, then sin rows): random direction, 1.5-5 cycles
    across the frame, mostly light and dark with a little colour: in photographs a class's texture and shape
    live in luminance (a greyscale photo keeps most of what identifies it), so colour jitter and greyscale
    conversion, which DINO's augmentation applies, leave the texture. A sample mixes them with its own phases."""
    theta = torch.rand(n, generator=gen, dtype=torch.float64) * math.pi
    freq = 1.5 + 3.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    colour = 1.0 + 0.35 * torch.randn(n, 3, generator=gen, dtype=torch.float64)  # luminance + a little chroma
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


# ---- Captions (Sec. 3.2, Appx. C.2) -----------------------------------------------------------------

UNRELATED_TAGS = ["nikon", "canon", "2008", "2011", "2013", "summer", "winter", "vacation", "travel",
                  "nature", "family", "friends", "flickr", "photo", "explore", "city", "holiday", "art",
                  "macro", "outdoor", "weekend", "sunset", "park", "home", "trip", "bokeh", "hdr"]
GENERIC_TITLES = ["IMG_{n}", "DSC{n}", "Untitled", "photo {n}", "Day {d}", "Summer {y}", "My trip {y}",
                  "Weekend", "Holiday snaps", "P{n}", "Home", "At the park", "Sunday afternoon"]
PLACES = ["the zoo", "home", "the park", "the lake", "the market", "the beach", "my garden", "work"]
# How people caption photos: they say it is a photo, and of what quality ("a blurry shot of my ..."). These
# are also the words of CLIP's 80 zero-shot prompts, which a text tower trained on captions without them
# would see for the first time at evaluation.
PHOTO_PHRASES = ["a photo of", "a picture of", "a close-up photo of", "a blurry photo of", "a bright photo of",
                 "a dark photo of", "a black and white photo of", "a good photo of", "a bad photo of",
                 "a cropped photo of", "a low resolution photo of", "a nice shot of", "a snapshot of", "itap of"]


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
        return _pick(rng, ["{x}", "My {x}", "{x} at {p}", "A {x}", "{x}!", "The {x}", "Photo of my {x}",
                           "{x} close-up", "A picture of the {x}"]).format(x=_mention(rng, concept), p=_pick(rng, PLACES))
    if r < 0.50 and clutter_names:  # ... or are about something else in the picture
        return f"{_pick(rng, clutter_names)} at {_pick(rng, PLACES)}"
    return _pick(rng, GENERIC_TITLES).format(n=int(rng.integers(1000, 99999)), d=int(rng.integers(1, 30)),
                                             y=int(rng.integers(2004, 2015)))


def _description(rng, concept, attrs, clutter_names):
    """A Flickr-like description: what the photo shows (the class, a synonym, a similar class or just 'thing'),
    now and then a visual detail of this very image (its colour, size, position, background), other objects,
    a remark."""
    colour, position, size, background = attrs
    r = rng.random()
    if r < 0.55:  # the class (or a synonym)
        what = _mention(rng, concept)
    elif r < 0.70 and concept.related:  # a related (similar) class's name: realistic confusion
        what = _pick(rng, concept.related)
    else:
        what = _pick(rng, ["thing", "animal or object", "one", "subject"])
    size_word = SIZES[size] + " " if SIZES[size] and rng.random() < 0.3 else ""
    colour_word = colour + " " if rng.random() < 0.3 else ""
    opening = _pick(rng, PHOTO_PHRASES).capitalize() + " a" if rng.random() < 0.5 else "A"
    text = f"{opening} {size_word}{colour_word}{what}"
    if rng.random() < 0.3:
        text += f" {position}"
    if rng.random() < 0.3:
        text += f", {background} background"
    text += "."
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


# The order the authors' released caption variants join the fields in (data_utils/
# create_incaps_caption_variants.py: title, tags, description); --caption-fields picks a subset.
CAPTION_FIELDS = ("title", "tags", "description")


def natural_caption(rng, concept, attrs, fields, clutter_names=(), other_names=()):
    """A synthetic IN-Caps-like caption: the chosen fields of title / tags / description, joined in the
    released code's order. More fields -> more descriptive (Fig. 3): the class is mentioned in ~40% of
    titles, ~55% of descriptions (plus ~15% naming a similar class instead) and ~75% of tag lists, and the
    description adds what the image shows (colour, size, position, background, other objects)."""
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
                  class_name="none", real_fields=None):
    """The caption of one training sample (Sec. 3.2):
      template         - one of the 80 CLIP templates with the class name;
      template-synset  - a template with a random WordNet synonym of the class;
      natural          - title / tags / description (`fields`, joined in CAPTION_FIELDS' order): the real
                         fields when the data has them (`real_fields`), else synthetic ones from `attrs`.
    class_name adds the class name once more: "front" ("{name} {caption}", the authors' released caption
    variants), "end" ("{caption} {name}") or "none"."""
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
    if class_name not in ("front", "end", "none"):
        raise ValueError(f"unknown class-name position {class_name!r}: use front, end or none")
    return {"front": f"{concept.name} {caption}", "end": f"{caption} {concept.name}", "none": caption}[class_name]


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


def caption_corpus(seed, size, head="openclip-vitb32-laion400m"):
    """`size` captions of all 1,000 ImageNet classes, uniformly, and their class ids: the text a web-scale
    CLIP text encoder has seen about every class, rare ones included (Sec. 3.5). A third are CLIP
    templates with the class name, a third templates with a WordNet synonym, a third natural captions with
    every field (title, tags, description) about an imagined photo: random colour, size, position,
    background and other objects. Text only: nothing is rendered."""
    from classes import imagenet_synonyms

    rng = np.random.default_rng([seed, 23])
    names, synonyms, related = imagenet_classnames(), imagenet_synonyms(), _related_names(head)
    palette = list(PALETTE)
    labels = rng.integers(1000, size=size)
    captions = []
    for c in labels.tolist():
        concept = Concept(names[c], synonyms[c], related[c])
        kind = ("template", "template-synset", "natural")[int(rng.integers(3))]
        attrs = (_pick(rng, palette), _pick(rng, POSITIONS), int(rng.integers(3)), _pick(rng, palette))
        clutter = [names[int(k)] for k in rng.integers(1000, size=int(rng.integers(3)))]
        captions.append(build_caption(rng, concept, kind, attrs=attrs, clutter_names=clutter, other_names=names,
                                      class_name=_pick(rng, ["front", "end"]) if kind == "natural" else "none"))
    return captions, labels
