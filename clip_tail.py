"""CLIP on long-tailed data: the controlled study of Wen et al., "Generalization Beyond Data Imbalance: A
Controlled Study on CLIP for Transferable Insights" (NeurIPS 2024), Sec. 3.2-3.7, and its analysis of
pre-trained CLIP models (Fig. 1b, Fig. 18).

The finding this script measures: CLIP trained on long-tailed image-text data is far less biased towards
frequent classes than supervised learning, because its pretext task is a *dynamic* classification
problem. The captions of one batch name only the classes that happen to be in it (count_batch_classes:
the paper's "about 600 classes in a batch of 1024"), so dominant classes cannot take over the learning
signal. The flags vary what the paper varies: caption kind and descriptiveness (Sec. 3.2, --captions,
--caption-fields), negatives shared across processes or not (Sec. 3.3, --local-loss), data scale,
imbalance and open-world concepts (Sec. 3.4-3.6, data flags), and the text encoder (Sec. 3.5,
--text-init, --lock-text).

  python clip_tail.py                                 # embedded synthetic world, small open_clip model
  torchrun --nproc_per_node=N clip_tail.py ...        # same numbers on N processes (same global batch)
  python clip_tail.py --recipe paper --data incaps --data-root DIR --val-root IMAGENET_VAL   # Appx. C.1
  python clip_tail.py --captions template --export-head head.pt   # text classifier for sl_tail.py --head frozen
  python clip_tail.py --eval-only --pretrained RN50:yfcc15m:yfcc15m --pretrained ViT-B-32:laion400m_e32:laion400m \\
      --classes in1k --val-root IMAGENET_VAL          # Fig. 1b: one row per model in results.csv

Outputs in --out: args.json, log.jsonl, checkpoint.pt, final.json, per_class.csv, eval.npz. checkpoint.pt
is in open_clip's format: after open_clip.add_model_config(clip_tail.MODEL_CONFIGS),
open_clip.create_model_and_transforms(MODEL, pretrained="runs/clip/checkpoint.pt") loads it.
"""
import argparse
import csv
import json
import logging
import math
import os
import sys
import time

# On a shared CPU, OpenMP threads that spin while they wait starve every other process and themselves
# (measured here: a training step 8x slower with 2 threads on 2 busy cores); PASSIVE lets them sleep.
# It must be set before torch loads its OpenMP runtime; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402 (after the OpenMP setting)
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F
import torchvision.transforms as T
from open_clip.factory import load_state_dict
from open_clip.loss import ClipLoss
from tqdm import tqdm

import metrics
from classes import (frequency_profile, imagenet_classnames, imagenet_synonyms, load_head, profile_table_path,
                     read_frequency_table, select_classes)
from data import add_data_args, data_flag_names, data_identity, load_data
from runtime import (ArgumentParser, RunDir, all_gather_cat, channels_last, check_batch_split, check_finite,
                     check_run_folder, eval_loader, gather_eval, init_distributed, load_checkpoint, rng_state, run_cli,
                     save_checkpoint, seed_everything, set_rng_state, sync_batchnorm, train_loader, warn_changed_flags,
                     write_json)
from sources import LongTailData, eval_image_folder
from world import caption_corpus

# The small open_clip model of the embedded default (a ModifiedResNet [1,1,1,1] of width 16 at 32 px and a
# 2-layer, 128-wide text transformer), registered with open_clip rather than written by hand.
MODEL_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metadata", "model_configs")
open_clip.add_model_config(MODEL_CONFIGS)

RECIPES = {
    # Appx. C.1, as the paper's released scripts ran open_clip's trainer: RN50, 4 GPUs x 256, AdamW lr 1e-3,
    # betas (0.9, 0.999), eps 1e-8, cosine schedule with 500 warm-up steps, 32 epochs, and open_clip's
    # default weight decay 0.2 (the scripts do not set it).
    "paper": dict(model="RN50", epochs=32, batch_size=1024, lr=1e-3, wd=0.2, warmup=500),
    # Scaled down so that `python clip_tail.py` trains and evaluates in minutes on a 2-core CPU.
    "default": dict(model="RN-tiny", epochs=6, batch_size=256, lr=2e-3, wd=0.2, warmup=50),
}

# Prompt sets of the zero-shot classifier (Appx. C.6: the 80 CLIP templates; the others as in the paper's code).
TEMPLATES = {
    "openai": open_clip.OPENAI_IMAGENET_TEMPLATES,
    "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES,
    "cname": (lambda c: f"{c}",),
    "a+cname": (lambda c: f"a {c}",),
    "photo": (lambda c: f"a photo of a {c}",),
}
RESULT_COLUMNS = ["model", "pretrained", "freq_table", "top1", "corr_acc", "corr_pred", "nc1", "nc2_m", "nc2_w"]


def parse_args(argv=None):
    p = ArgumentParser(prog="clip_tail.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/clip", help="run folder (default runs/clip)")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="hyper-parameter set; explicit flags override it (paper = Appx. C.1)")
    p.add_argument("--model", default=None, help="open_clip model name (default: RN-tiny; RN50 for --recipe paper)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch, all processes together")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate")
    p.add_argument("--wd", type=float, default=None, help="AdamW weight decay (not on gains, biases, logit scale)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps before the cosine decay")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--local-loss", action="store_true",
                   help="Sec. 3.3: contrast each process's samples among themselves (negatives not shared)")
    p.add_argument("--text-init", default=None, metavar="TAG|CKPT",
                   help="Sec. 3.5: initialise the text tower from an open_clip pretrained tag of --model "
                        "(MODEL:TAG for another model; weights must be in the local cache) or a checkpoint.pt")
    p.add_argument("--lock-text", action="store_true",
                   help="freeze the --text-init or --distill-text text tower (else fine-tuned)")
    p.add_argument("--distill-text", default=None, metavar="HEAD",
                   help="pre-train the text tower first, text only, on captions of all 1,000 ImageNet classes, "
                        "onto a real CLIP's class embeddings (a shipped head: clip-rn50, ...): the synthetic "
                        "world's stand-in for a text encoder pre-trained on 400M pairs (Sec. 3.5)")
    p.add_argument("--distill-steps", type=int, default=600, help="--distill-text: steps of --batch-size captions")
    p.add_argument("--templates", default="openai", choices=sorted(TEMPLATES),
                   help="prompts of the zero-shot classifier (default: the 80 CLIP templates)")
    p.add_argument("--freq-table", default=None, metavar="NAME",
                   help="correlate with this frequency profile (metadata/freqs name or file) instead of the "
                        "training counts; default for --pretrained entries without their own")
    p.add_argument("--export-head", default=None, metavar="FILE",
                   help="write the text classifier {'prototypes': [C, D], 'classnames'} for sl_tail.py --head-file")
    p.add_argument("--eval-only", action="store_true",
                   help="only evaluate: --pretrained models, --checkpoint FILE, or the run in --out (--resume)")
    p.add_argument("--pretrained", action="append", default=[], metavar="[MODEL:]TAG[:FREQ]",
                   help="with --eval-only: an open_clip model and pretrained tag (or weight file), optionally the "
                        "frequency profile of its training data; repeatable")
    p.add_argument("--checkpoint", default=None, help="with --eval-only: a checkpoint.pt this script wrote")
    add_data_args(p)
    args = p.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.wd < 0 or args.warmup < 0:
        raise ValueError("--epochs and --batch-size must be >= 1, --lr > 0, --wd and --warmup >= 0")
    if args.lock_text and not (args.text_init or args.distill_text):
        raise ValueError("--lock-text freezes an initialised text tower: give --text-init TAG|CKPT or --distill-text")
    if args.distill_text:
        if args.text_init:
            raise ValueError("give --text-init or --distill-text, not both")
        if args.distill_steps < 1:
            raise ValueError(f"--distill-steps must be >= 1, got {args.distill_steps}")
        load_head(args.distill_text, range(1000))  # a missing or malformed head fails now
    if args.pretrained and not args.eval_only:
        raise ValueError("--pretrained evaluates open_clip models with --eval-only; to start from a "
                         "pre-trained text tower use --text-init")
    if args.eval_only and not (args.pretrained or args.checkpoint or args.resume):
        raise ValueError("--eval-only needs --pretrained MODEL:TAG, --checkpoint FILE or --resume (the run in --out)")
    check_model_name(args.model, "--model")
    for freq in [args.freq_table] + [freq for _, _, freq in pretrained_entries(args)]:
        path = profile_table_path(freq) if freq else None  # a bad table fails now, not after training
        if path:
            read_frequency_table(path)
    head_folder = os.path.dirname(os.path.abspath(args.export_head)) if args.export_head else None
    while head_folder and not os.path.exists(head_folder):
        head_folder = os.path.dirname(head_folder)
    if head_folder and not os.path.isdir(head_folder):
        raise ValueError(f"--export-head {args.export_head}: {head_folder} is a file, not a folder")
    return args


def pretrained_entries(args):
    """--pretrained [MODEL:]TAG[:FREQ] -> [(model, tag, frequency profile or --freq-table)]."""
    entries = []
    for spec in args.pretrained:
        parts = spec.split(":")
        if len(parts) == 1 and args.model:
            parts = [args.model] + parts
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"--pretrained {spec!r}: expected MODEL:TAG[:FREQ] (or TAG with --model)")
        check_model_name(parts[0], f"--pretrained {spec}")
        entries.append((parts[0], parts[1], parts[2] if len(parts) == 3 else args.freq_table))
    return entries


def check_model_name(name, flag):
    if name not in open_clip.list_models():
        raise ValueError(f"{flag}: {name!r} is not an open_clip model (see open_clip.list_models(): e.g. RN50, "
                         "ViT-B-32, or this toolkit's RN-tiny, RN-micro)")


# ------------------------------------------------------------------------------------------------------
# Model (open_clip), optimiser and schedule (Appx. C.1)
# ------------------------------------------------------------------------------------------------------

def cached_pretrained_file(model_name, tag):
    """The local file of open_clip's pretrained weights `tag` for `model_name` (a file path is returned as
    is). Never touches the network: open_clip itself would try to download, which hangs or fails late
    offline, so a missing file is a FileNotFoundError saying what to download and where it must land."""
    if os.path.isfile(tag):
        return tag
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ValueError(f"open_clip model {model_name!r} has no pretrained tag {tag!r} (known: {known}); "
                         "or give a weight file")
    places = []
    if cfg.get("hf_hub"):
        import huggingface_hub
        repo, filename = os.path.split(cfg["hf_hub"])
        for name in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            found = huggingface_hub.try_to_load_from_cache(repo, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        places.append(f"Hugging Face hub repo {repo} into {huggingface_hub.constants.HF_HUB_CACHE}")
    if cfg.get("url"):
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(path):
            return path
        places.append(f"{cfg['url']} to {path}")
    raise FileNotFoundError(f"weights of open_clip {model_name} pretrained={tag} are not in the local cache; "
                            f"download them once with network access (open_clip.create_model('{model_name}', "
                            f"pretrained='{tag}') does it): {' or '.join(places)}")


def is_text_key(key):
    """State-dict keys of CLIP's text tower (token/positional embeddings, transformer, ln_final, projection)."""
    return not key.startswith("visual.") and key not in ("logit_scale", "logit_bias")


def read_weights(path, reader=load_state_dict, **kwargs):
    """reader(path) for a --text-init weight file, any failure a one-line error naming the file."""
    try:
        state = reader(path, **kwargs)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict")
        return state
    except Exception as e:  # not a torch file, foreign objects, truncated
        raise ValueError(f"--text-init {path}: cannot read its weights ({str(e).splitlines()[0]})") from None


def randomly_initialised_model(name, **kwargs):
    """open_clip.create_model without pretrained weights, which is what this script asks for (weights of a
    text tower or a checkpoint are loaded afterwards): open_clip's warning that none were loaded is dropped."""
    expected = logging.Filter()
    expected.filter = lambda record: not record.getMessage().startswith("No pretrained weights loaded for model")
    root = logging.getLogger()
    root.addFilter(expected)
    try:
        return channels_last(open_clip.create_model(name, **kwargs))
    finally:
        root.removeFilter(expected)


def build_model(args, device):
    """An open_clip CLIP model from scratch (Sec. 3.2), its text tower optionally initialised from
    pre-trained weights and frozen or fine-tuned (Sec. 3.5, Appx. C.4). Returns (model, quick_gelu)."""
    text_state, quick_gelu = None, False
    if args.text_init:
        tag = args.text_init.rpartition(":")[2]  # (TAG, MODEL:TAG, a file, or MODEL:file)
        looks_like_file = os.sep in tag or tag.endswith((".pt", ".bin", ".safetensors"))
        if looks_like_file and not os.path.isfile(tag) and not os.path.isfile(args.text_init):
            raise FileNotFoundError(f"--text-init {args.text_init}: no such file")  # (not an open_clip tag)
        if os.path.isfile(args.text_init):
            path = args.text_init
            saved = {} if path.endswith(".safetensors") else read_weights(path, torch.load, map_location="cpu",
                                                                              weights_only=True)
            quick_gelu = isinstance(saved, dict) and bool(saved.get("quick_gelu", False))  # ours record it
        else:
            name, _, tag = args.text_init.rpartition(":")
            name = name or args.model
            path = cached_pretrained_file(name, tag)
            quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
        text_state = {k: v for k, v in read_weights(path).items() if is_text_key(k)}
    model = randomly_initialised_model(args.model, force_image_size=args.image_size, force_quick_gelu=quick_gelu,
                                       device=device)
    if text_state is not None:
        own = {k: v for k, v in model.state_dict().items() if is_text_key(k)}
        wrong = [k for k in own if k not in text_state or text_state[k].shape != own[k].shape]
        if wrong:
            raise ValueError(f"--text-init {args.text_init}: its text tower does not fit --model {args.model} "
                             f"(e.g. {wrong[0]})")
        model.load_state_dict({k: text_state[k] for k in own}, strict=False)
    if args.lock_text and not args.distill_text:  # (a distilled tower is locked once distilled)
        model.lock_text_tower()
    return model, quick_gelu


def adamw(model, args):
    """AdamW as open_clip trains CLIP: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
            (no_decay if skip else decay).append(p)
    return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": args.wd}],
                             lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def cosine_schedule(optimizer, warmup, total_steps):
    """Linear warm-up over `warmup` steps, then cosine decay to zero (open_clip's cosine_lr)."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(args, device):
    """--amp: bfloat16 autocast on CUDA (no loss scaling needed; init_distributed refuses --amp without a GPU)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp)


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------------------
# A pre-trained text encoder in miniature (Sec. 3.5): distilled from a real CLIP's class embeddings
# ------------------------------------------------------------------------------------------------------

def text_targets(head, dim):
    """A real CLIP's text embeddings of the 1,000 ImageNet classes (metadata/heads), centred, projected on
    their top `dim` principal components and l2-normalised: what that encoder knows of every class and of
    how the classes relate, in the model's embedding size."""
    e = load_head(head, range(1000)).double()
    e = e - e.mean(0, keepdim=True)
    e = e @ torch.linalg.svd(e, full_matrices=False).Vh[:dim].T
    return F.normalize(e, dim=1).float()


def distill_text_tower(model, tokenizer, args, device, temperature=0.05):
    """Train only the text tower so that a caption of class c (a template with its name or a synonym, or a
    natural caption) embeds next to c's target (text_targets): a cross-entropy over all 1,000 classes of
    cos(caption, target) / temperature. The captions come from world.caption_corpus: every ImageNet class
    equally often, so the tower knows the rare classes as well as the frequent ones, as CLIP's does after
    400M pairs. Returns the final loss and caption -> class accuracy (the last 10% of steps)."""
    targets = text_targets(args.distill_text, model.text_projection.shape[1]).to(device)
    captions, labels = caption_corpus(args.seed, args.distill_steps * args.batch_size)
    labels = torch.as_tensor(labels, device=device)
    params = [p for name, p in model.named_parameters() if is_text_key(name) and p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.wd)
    scheduler = cosine_schedule(optimizer, min(args.warmup, args.distill_steps // 10), args.distill_steps)
    tail, losses, hits = max(1, args.distill_steps // 10), [], []
    for step in tqdm(range(args.distill_steps), desc="distilling the text tower", leave=False):
        batch = slice(step * args.batch_size, (step + 1) * args.batch_size)
        with autocast(args, device):
            text = model.encode_text(tokenizer(captions[batch]).to(device), normalize=True)
        logits = text.float() @ targets.T / temperature
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step >= args.distill_steps - tail:
            losses.append(loss.item())
            hits.append((logits.argmax(1) == labels[batch]).float().mean().item())
    return dict(distill_loss=float(np.mean(losses)), distill_top1=float(np.mean(hits)))


# ------------------------------------------------------------------------------------------------------
# The contrastive pretext task (Sec. 3.3)
# ------------------------------------------------------------------------------------------------------

def contrastive_loss(dist, local_loss=False):
    """CLIP's symmetric cross-entropy between image and caption embeddings (open_clip.loss.ClipLoss).

    Default: negatives gathered from every process, so the loss is that of the global batch whatever the
    number of processes. Each rank takes the rows of its own samples against all gathered columns
    (open_clip's local_loss=True, i.e. the mean over local rows, as DDP expects) and gradients flow back
    through the gather (gather_with_grad=True): DDP's gradient average is the one-process gradient.
    --local-loss: negatives stay on their process, as in Sec. 3.3 ("not shared across devices"); each
    rank contrasts its B/N samples among themselves (with one process this is the default)."""
    if local_loss or dist.world_size == 1:
        return ClipLoss()
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=dist.rank, world_size=dist.world_size)


def count_batch_classes(labels):
    """CLIP's vocabulary in one global batch: the number of distinct evaluated classes its captions can
    name (Sec. 3.3: "about 600 classes in a batch of 1024"). Open-world samples (label -1) are not counted."""
    return int(torch.unique(labels[labels >= 0]).numel())


def train_one_epoch(model, loss_fn, tokenizer, optimizer, scheduler, data, epoch, dist, args):
    model.train()
    data.train.set_epoch(epoch)  # captions and augmentation are drawn per (data seed, epoch, sample)
    loader = train_loader(data.train, args.batch_size, dist, args.seed, epoch, args.workers)
    losses, batch_classes = [], []
    for step, (images, labels, captions) in enumerate(tqdm(loader, disable=not dist.is_main, leave=False,
                                                             desc=f"epoch {epoch + 1}/{args.epochs}")):
        images, texts = images.to(dist.device, non_blocking=True), tokenizer(list(captions)).to(dist.device)
        with autocast(args, dist.device):
            image_features, text_features, logit_scale = model(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
        rank_losses = all_gather_cat(loss.detach().float().reshape(1), dist)
        check_finite(rank_losses.sum(), epoch, step)  # every rank sees every loss, so all stop together
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # learnable temperature, clamped at 100 as in CLIP / open_clip
            unwrap(model).logit_scale.clamp_(0, math.log(100))
        losses.append(rank_losses.mean().item())
        if args.local_loss:  # each process contrasts only its own samples: the mean of their class counts
            counts = all_gather_cat(torch.tensor([count_batch_classes(labels)], dtype=torch.float64), dist)
            batch_classes.append(counts.mean().item())
        else:
            batch_classes.append(count_batch_classes(all_gather_cat(labels, dist)))
    return float(np.mean(losses)), float(np.mean(batch_classes))


# ------------------------------------------------------------------------------------------------------
# Zero-shot evaluation (Sec. 3.1, Appx. C.6)
# ------------------------------------------------------------------------------------------------------

def zero_shot_classifier(model, tokenizer, classnames, templates, device):
    """Class embeddings [C, D]: every class name in every template, each text embedding l2-normalised,
    averaged over the templates and renormalised (open_clip.build_zero_shot_classifier)."""
    model.eval()
    return open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates, device=device).T.contiguous()


def zero_shot_predict(model, classifier, dataset, dist, args):
    """Each image's class = the class embedding nearest to its image embedding (cosine). Returns preds,
    labels and the un-normalised image embeddings (for the NC metrics) in dataset order on every rank."""
    model.eval()
    loader = eval_loader(dataset, args.batch_size, dist, args.workers)
    features, labels = [], []
    with torch.no_grad(), autocast(args, dist.device):
        for images, y in loader:
            features.append(model.encode_image(images.to(dist.device)).float().cpu())
            labels.append(torch.as_tensor(y))
    features, labels = gather_eval(loader.shard, dist, torch.cat(features), torch.cat(labels))
    preds = (F.normalize(features, dim=-1) @ classifier.float().cpu().T).argmax(dim=1)
    return preds, labels, features


def evaluate_and_write(model, tokenizer, data, train_counts, out, dist, args, extra=None):
    """Zero-shot evaluation on the test split and every extra set; rank 0 writes final.json, per_class.csv
    and eval.npz (per-class accuracy and prediction counts vs training frequency, NC metrics of the image
    embeddings with the text classifier as NC2_W) and the --export-head file. Returns final (rank 0)."""
    classifier = zero_shot_classifier(model, tokenizer, data.classnames, TEMPLATES[args.templates], dist.device)
    extra = dict(extra or {})
    for name, dataset in sorted(data.extra_eval.items()):
        preds, labels, features = zero_shot_predict(model, classifier, dataset, dist, args)
        if dist.is_main:
            extra.update(metrics.write_extra_eval_outputs(out, name, preds, labels, train_counts, data.classnames,
                                                          features, classifier, data.tail_classes))
    preds, labels, features = zero_shot_predict(model, classifier, data.test, dist, args)
    if not dist.is_main:
        return None
    if args.export_head:  # before final.json, which run_all.sh takes as "finished"
        os.makedirs(os.path.dirname(os.path.abspath(args.export_head)), exist_ok=True)
        save_checkpoint(args.export_head, {"prototypes": classifier.float().cpu(), "classnames": list(data.classnames),
                                           "imagenet_ids": list(data.imagenet_ids), "templates": args.templates})
    final = metrics.write_eval_outputs(out, preds, labels, train_counts, data.classnames, features, classifier,
                                       data.tail_classes, extra)
    print(f"zero-shot top-1 {final['top1']:.4f}  corr_acc {final['corr_acc']:.3f}  "
          f"corr_pred {final['corr_pred']:.3f}  ({out})")
    return final


def class_frequencies(data, freq_table):
    """The frequencies per-class results are correlated with: a named profile, else the training counts."""
    return frequency_profile(freq_table, data.imagenet_ids) if freq_table else data.train_counts


# ------------------------------------------------------------------------------------------------------
# Checkpoints: open_clip's format ('state_dict', no DDP prefix) plus what an exact --resume needs
# ------------------------------------------------------------------------------------------------------

def checkpoint_rng_state():
    """data.rng_state() with numpy's key array as a tensor: open_clip reads checkpoint.pt with
    torch.load(weights_only=True), which refuses numpy arrays."""
    state = rng_state()
    name, keys, pos, has_gauss, gauss = state["numpy"]
    state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return state


def restore_rng_state(state):
    name, keys, pos, has_gauss, gauss = state["numpy"]
    set_rng_state({**state, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)})


def checkpoint_state(model, optimizer, scheduler, epoch, batch_classes, quick_gelu, args):
    return {"epoch": epoch, "state_dict": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": checkpoint_rng_state(), "batch_classes": batch_classes,
            "model_name": args.model, "image_size": args.image_size, "quick_gelu": quick_gelu, "args": vars(args)}


def default_image_size(args):
    """The synthetic world is rendered at 32 px; real data at the model's own resolution."""
    return 32 if args.data == "synthetic" else open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]


# ------------------------------------------------------------------------------------------------------
# Evaluation only: pre-trained open_clip models (Fig. 1b, Fig. 18) or a run of this script
# ------------------------------------------------------------------------------------------------------

def pretrained_model(name, tag, device):
    """An open_clip model with its pretrained weights from the local cache, and its test transform:
    open_clip's own (shorter side resized, centre crop, the weights' mean / std)."""
    path = cached_pretrained_file(name, tag)
    cfg = open_clip.get_pretrained_cfg(name, tag) if not os.path.isfile(tag) else {}
    try:
        model = open_clip.create_model(name, pretrained=path, force_quick_gelu=bool(cfg.get("quick_gelu")),
                                       device=device)
    except Exception as e:  # not a weight file, another model's weights, truncated
        raise ValueError(f"--pretrained {name}:{tag}: cannot load {path} ({str(e).splitlines()[0][:200]})") from None
    transform = open_clip.image_transform(model.visual.image_size, is_train=False, mean=cfg.get("mean"),
                                          std=cfg.get("std"), resize_mode=cfg.get("resize_mode"),
                                          interpolation=cfg.get("interpolation"))
    return model, transform


def validation_only_data(args, transform):
    """Fig. 1b needs no training set: the --classes of ImageNet (in1k for the full val set) read from the
    --val-root ImageFolder (and --extra-eval folders), frequencies from a table (--freq-table / :FREQ)."""
    ids = select_classes(args.classes)
    names, synonyms = [imagenet_classnames()[i] for i in ids], [imagenet_synonyms()[i] for i in ids]
    folders = dict(spec.partition("=")[::2] for spec in args.extra_eval)
    return LongTailData(classnames=names, synonyms=synonyms, imagenet_ids=ids, train_counts=None, train=None,
                        test=eval_image_folder(args.val_root, names, ids, transform, args.max_bad_frac),
                        extra_eval={name: eval_image_folder(folder, names, ids, transform, args.max_bad_frac)
                                    for name, folder in folders.items()})


def evaluate_pretrained(args, dist):
    entries = pretrained_entries(args)
    validation_only = args.data == "synthetic" and args.val_root
    for name, tag, freq in entries:  # all weights (and frequency tables) present before any work starts
        cached_pretrained_file(name, tag)
        if validation_only and not freq:
            raise ValueError(f"--pretrained {name}:{tag}: give the frequency profile of its training data "
                             "(MODEL:TAG:FREQ or --freq-table NAME), or a training set by data flags")
    rows = []
    for name, tag, freq in entries:
        model, transform = pretrained_model(name, tag, dist.device)
        if validation_only:
            data = validation_only_data(args, transform)
        else:  # the synthetic world's images are uint8 tensors; open_clip's transform reads PIL images
            pil_first = T.Compose([T.ToPILImage(), transform]) if args.data == "synthetic" else transform
            data = load_data(args, test_transform=pil_first)
        out = os.path.join(args.out, f"{name}_{os.path.basename(tag)}".replace("/", "-"))
        final = evaluate_and_write(model, open_clip.get_tokenizer(name), data, class_frequencies(data, freq), out,
                                   dist, args, extra=dict(model=name, pretrained=tag, freq_table=freq))
        rows.append({key: final[key] for key in RESULT_COLUMNS} if dist.is_main else None)
    if dist.is_main:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "results.json"), rows)
        with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {os.path.join(args.out, 'results.csv')} ({len(rows)} models)")


def evaluate_checkpoint(args, dist):
    path = args.checkpoint or os.path.join(args.out, "checkpoint.pt")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "state_dict" not in state or "model_name" not in state:
        raise ValueError(f"{path} is not a checkpoint written by clip_tail.py")
    args.model, args.image_size = state["model_name"], state["image_size"]
    if dist.is_main and "args" in state:  # the test set and frequencies come from the data flags given now
        warn_changed_flags(json.loads(json.dumps(state["args"], default=str)), args, path, keys=data_flag_names())
    model = randomly_initialised_model(args.model, force_image_size=args.image_size,
                                       force_quick_gelu=state["quick_gelu"], device=dist.device)
    model.load_state_dict(state["state_dict"])
    data = load_data(args)
    evaluate_and_write(model, open_clip.get_tokenizer(args.model), data, class_frequencies(data, args.freq_table),
                       args.out, dist, args, extra=dict(checkpoint=path, epochs_trained=state["epoch"]))


# ------------------------------------------------------------------------------------------------------
# Training run
# ------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    dist = init_distributed(args.device, args.amp)
    if args.eval_only:  # (evaluate_and_write creates --out once there is something to write)
        return evaluate_pretrained(args, dist) if args.pretrained else evaluate_checkpoint(args, dist)
    if args.image_size is None:
        args.image_size = default_image_size(args)
    if args.image_size < 32:
        raise ValueError(f"--image-size must be >= 32 (the image towers downsample 32x), got {args.image_size}")
    check_batch_split(args.batch_size, dist)
    check_run_folder(args.out, args.resume)
    data = load_data(args)  # bad data flags fail before the model is built
    seed_everything(args.seed)  # same initial weights on every rank
    model, quick_gelu = build_model(args, dist.device)
    steps_per_epoch = len(data.train) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(data.train)} training samples")
    if args.warmup >= args.epochs * steps_per_epoch and dist.is_main:
        print(f"warning: --warmup {args.warmup} is not shorter than the run's {args.epochs * steps_per_epoch} "
              "steps: the learning rate never reaches --lr", file=sys.stderr)
    # its folder is made once the inputs are known to be good
    run = RunDir(args.out, args, dist, resume=args.resume, identity=data_identity(data))
    tokenizer = open_clip.get_tokenizer(args.model)
    state = run.resume_state() if args.resume else None
    distilled = {}
    if args.distill_text:  # a resumed run has its distilled tower in the checkpoint
        if state is None:
            distilled = distill_text_tower(model, tokenizer, args, dist.device)
            if dist.is_main:
                print(f"text tower distilled onto {args.distill_text}: loss {distilled['distill_loss']:.3f}, "
                      f"caption -> class top-1 {distilled['distill_top1']:.3f}")
        else:
            distilled = state.get("distilled", {})
        if args.lock_text:
            model.lock_text_tower()
    optimizer = adamw(model, args)
    scheduler = cosine_schedule(optimizer, args.warmup, args.epochs * steps_per_epoch)
    start_epoch, batch_classes = 0, []
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start_epoch, batch_classes = state["epoch"], list(state["batch_classes"])
        if dist.is_main:
            print(f"resumed {args.out} after epoch {start_epoch}")
    if dist.world_size > 1:
        model = sync_batchnorm(model, dist)  # BatchNorm over the global batch, as one process would
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    loss_fn = contrastive_loss(dist, args.local_loss)

    started = time.time()
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        loss, classes = train_one_epoch(model, loss_fn, tokenizer, optimizer, scheduler, data, epoch, dist, args)
        batch_classes.append(classes)
        record = dict(epoch=epoch, loss=loss, batch_classes=classes, lr=scheduler.get_last_lr()[-1],
                      logit_scale=unwrap(model).logit_scale.exp().item(), time=time.time() - epoch_start)
        run.log_epoch(record)
        run.save(dict(checkpoint_state(model, optimizer, scheduler, epoch + 1, batch_classes, quick_gelu, args),
                      distilled=distilled))
        if dist.is_main:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  classes/batch {classes:.1f}  "
                  f"logit scale {record['logit_scale']:.1f}  {record['time']:.0f}s")

    evaluate_and_write(unwrap(model), tokenizer, data, class_frequencies(data, args.freq_table), args.out, dist, args,
                       extra=dict(distilled, batch_classes_mean=float(np.mean(batch_classes)),
                                  logit_scale=unwrap(model).logit_scale.exp().item(),
                                  train_seconds=time.time() - started))


if __name__ == "__main__":
    run_cli(main)
