"""The classes the experiments are about: ImageNet's class names and WordNet synonyms, class subsets
(ImageNet-100, the authors' rand<K> draws), how often each class occurs in the pre-training sets
(the paper's frequency tables, Appx. B.1, and counting class mentions in captions, Appx. B.2), and the
text embeddings of the class names (frozen heads, Sec. 4.1; the synthetic world's appearance).

    select_classes('in100')                  -> ImageNet ids
    frequency_profile('laionet-0.7', ids)    -> per-class frequencies
    load_head('clip-rn50', ids)              -> [C, D] prototypes
    estimate_class_frequency(captions, classnames, synonyms)
"""
import json
import math
import os
import re

import numpy as np
import torch

from runtime import atomic_write

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
METADATA_DIR = os.path.join(REPO_DIR, "metadata")
FREQ_DIR = os.path.join(METADATA_DIR, "freqs")
HEAD_DIR = os.path.join(METADATA_DIR, "heads")


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



# ---- Class frequency from captions (Appx. B.2) ---------------------------------------------------

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
