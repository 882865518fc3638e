"""Supervised learning on long-tailed data with vocabulary subsampling and frozen class prototypes.

Wen et al., "Generalization Beyond Data Imbalance: A Controlled Study on CLIP for Transferable Insights"
(NeurIPS 2024, arXiv 2405.21070), Sec. 3.3 and 4.1. CLIP's pretext task is a classification over the
few captions of a batch, not over every class; the paper transfers that to supervised learning (SL):
each iteration the cross-entropy competes only over a small vocabulary (the batch's classes plus a few
drawn by frequency), which de-biases SL towards CLIP's robustness; with frozen CLIP text prototypes as
the head it also generalises to classes seen once or never (the extreme long tail, Sec. 4.1).

    python sl_tail.py                                   # embedded synthetic world, all classes (--voc 0)
    torchrun --nproc_per_node=4 sl_tail.py --voc 100    # vocabulary of 100 classes per iteration
    python sl_tail.py --head frozen --head-file clip-rn50 --voc 20 --trim-tail 20 --tail-shots 0
    python sl_tail.py --recipe paper --data incaps --data-root DIR --val-root DIR/val
"""
import math
import os
import sys
import time

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other processes, two spinning threads
# made a training step ~10x slower (measured on a 2-core machine running other jobs). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402 (after the OpenMP setting, which must precede torch's import)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.modified_resnet import ModifiedResNet  # noqa: E402
from tqdm import tqdm  # noqa: E402

import classes  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402
import proto_ce  # noqa: E402
import runtime  # noqa: E402

# Appx. C.1 (the paper's SL recipe) as the authors' released train_sup.py runs it (cosine schedule, plain
# momentum: below), and a scaled-down default that trains the embedded synthetic world in minutes on a CPU.
# Vocabulary subsampling acts only when the images that share a vocabulary hold fewer classes than --voc:
# the paper's code draws one per GPU, from 256 / 4 = 64 images (~62 of ImageNet's 1,000 classes), hence
# --voc-scope local in the paper recipe (drawn from all 256, ~220 classes, a --voc of 100 or 200 would
# change nothing). The default recipe's 32-image batch of the 100-class world holds ~27 classes, so it
# draws one vocabulary per 16 images (~15 classes, --voc-images), as the paper's per-GPU draw does.
# Explicit flags override these.
RECIPES = {
    "paper": dict(model="rn50", epochs=90, batch_size=256, base_lr=0.1, momentum=0.9, weight_decay=1e-4,
                  workers=8, voc_scope="local", voc_images=0),
    "default": dict(model="rn-small", epochs=5, batch_size=32, base_lr=0.1, momentum=0.9, weight_decay=1e-4,
                    workers=0, voc_scope="global", voc_images=16),
}
# CLIP's modified ResNet (open_clip): RN50, and a small one for 32 px images (Sec. 3.1 / Appx. C.4)
LR_STEPS = (30 / 90, 50 / 90, 70 / 90)
MODELS = {"rn50": dict(layers=[3, 4, 6, 3], width=64), "rn-small": dict(layers=[1, 1, 1, 1], width=16)}


def parse_args(argv=None):
    p = runtime.ArgumentParser(description="Supervised learning with vocabulary subsampling (Sec. 3.3, 4.1)")
    p.add_argument("--out", default="runs/sl_tail", help="run directory (args.json, log.jsonl, final.json, ...)")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order and vocabulary draws")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="paper = Appx. C.1")
    def recipe_help(key, text=""):
        return text + " (" + ", ".join(f"{name} recipe: {r[key]}" for name, r in RECIPES.items()) + ")"

    p.add_argument("--model", default=None, choices=sorted(MODELS), help=recipe_help("model", "CLIP's modified ResNet"))
    p.add_argument("--embed-dim", type=int, default=None, help="feature/prototype dim (default: the head file's, else 1024)")
    p.add_argument("--epochs", type=int, default=None, help=recipe_help("epochs"))
    p.add_argument("--batch-size", type=int, default=None, help=recipe_help("batch_size", "global batch over all processes"))
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 x batch-size / 256 (Appx. C.1)")
    p.add_argument("--momentum", type=float, default=None, help=recipe_help("momentum", "SGD momentum"))
    p.add_argument("--nesterov", action="store_true",
                   help="Nesterov momentum, as Appx. C.1 says (the released train_sup.py runs plain momentum)")
    p.add_argument("--weight-decay", type=float, default=None, help=recipe_help("weight_decay"))
    p.add_argument("--lr-schedule", default="cosine", choices=["step", "cosine"],
                   help="cosine: to 0 over --epochs (default: what the authors' released train_sup.py runs, also for "
                   "its '--scheduler step', whose two branches are swapped); step: x0.1 at --lr-steps (Appx. C.1)")
    p.add_argument("--lr-steps", default=None,
                   help="epochs where the lr is multiplied by 0.1 (default: 1/3, 5/9, 7/9 of --epochs; paper 30,50,70)")
    p.add_argument("--workers", type=int, default=None, help=recipe_help("workers", "DataLoader workers per process"))
    p.add_argument("--voc", type=int, default=0, help="classes per iteration's vocabulary; 0 = all classes")
    p.add_argument("--voc-sampling", default="freq", choices=["freq", "sqrt", "uniform"],
                   help="fill classes drawn prop. to training frequency, its square root, or uniformly")
    p.add_argument("--voc-images", type=int, default=None,
                   help=recipe_help("voc_images", "images that share one vocabulary: each process's batch is cut "
                                    "into groups of this many, each with its own; 0 = one per --voc-scope"))
    p.add_argument("--voc-scope", default=None, choices=["global", "local"],
                   help=recipe_help("voc_scope", "global: one vocabulary from all processes' labels; local: one per "
                                    "process, from its share of the batch (the paper's code)"))
    p.add_argument("--head", default="learnable", choices=["learnable", "frozen", "finetune"],
                   help="class prototypes: trained from scratch, frozen from --head-file, or initialised from it")
    p.add_argument("--head-file", default=None, help="shipped head name (clip-rn50, ...) or a [C or 1000, D] tensor file")
    p.add_argument("--loss", default="ce", choices=["ce", "balanced-softmax", "logit-adjust", "focal"],
                   help="long-tail baselines: Balanced Softmax = logit adjustment with tau 1")
    p.add_argument("--la-tau", type=float, default=1.0, help="--loss logit-adjust: tau")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--sampler", default="instance", choices=["instance", "class-balanced"])
    p.add_argument("--posthoc-tau", type=float, default=0.0, help="test-time logit adjustment: logits - tau log prior")
    p.add_argument("--affinity-classes", type=int, default=20, help="classes in affinity.npz (Fig. 9a)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    data.add_data_args(p)
    args = p.parse_args(argv)

    recipe = RECIPES[args.recipe]
    for key in ("model", "epochs", "batch_size", "momentum", "weight_decay", "workers", "voc_scope", "voc_images"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.lr is None:
        args.lr = recipe["base_lr"] * args.batch_size / 256  # linear scaling rule, Appx. C.1
    explicit_steps = args.lr_steps is not None
    if args.lr_steps is None:
        args.lr_steps = ",".join(str(round(args.epochs * f)) for f in LR_STEPS)
    try:
        steps = [int(s) for s in str(args.lr_steps).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--lr-steps must be comma-separated epochs, got {args.lr_steps!r}") from None
    if explicit_steps and not all(1 <= s < args.epochs for s in steps):
        raise ValueError(f"--lr-steps must be epochs in [1, {args.epochs - 1}] (after which the lr decays), "
                         f"got {args.lr_steps}")
    # a repeated epoch decays twice there (MultiStepLR counts it), as when few --epochs round two steps together;
    # the recipe's steps round to 0 for very few --epochs: those are dropped
    args.lr_steps = sorted(s for s in steps if s > 0)
    for name, value, low in [("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--voc", args.voc, 0), ("--voc-images", args.voc_images, 0),
                             ("--workers", args.workers, 0), ("--seed", args.seed, 0),
                             ("--eval-batch-size", args.eval_batch_size, 1)]:
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.head == "learnable" and args.head_file:
        raise ValueError("--head-file needs --head frozen or --head finetune")
    if args.head != "learnable" and not args.head_file:
        raise ValueError(f"--head {args.head} needs --head-file (e.g. clip-rn50)")
    if not 0 <= args.momentum < 1 or args.focal_gamma < 0 or args.affinity_classes < 0:
        raise ValueError("--momentum must be in [0, 1), --focal-gamma and --affinity-classes >= 0")
    if args.embed_dim is not None and args.embed_dim < 1:
        raise ValueError(f"--embed-dim must be >= 1, got {args.embed_dim}")
    return args


# ---- Model (Sec. 3.1, Appx. C.4) --------------------------------------------------------------------

class PrototypeClassifier(torch.nn.Module):
    """CLIP's image encoder with class prototypes in place of the text tower: logit_c = s * cos(f(x), w_c),
    no bias; s = exp(t) is learnable, initialised to 1/0.07 and capped at 100 as in CLIP."""

    def __init__(self, encoder, prototypes, train_head):
        super().__init__()
        self.encoder = encoder
        if train_head:
            self.prototypes = torch.nn.Parameter(prototypes.clone())
        else:  # frozen head (Sec. 4.1): a buffer, so only the backbone and the logit scale train
            self.register_buffer("prototypes", prototypes.clone())
        self.log_logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images):
        """-> l2-normalised features [B, D] (float32), l2-normalised prototypes [C, D], logit scale."""
        features = F.normalize(self.encoder(images).float(), dim=-1)
        prototypes = F.normalize(self.prototypes.float(), dim=-1)
        return features, prototypes, self.log_logit_scale.exp()

    @torch.no_grad()
    def cap_logit_scale(self):
        """After each optimizer step: s <= 100, as CLIP caps it. On the parameter, not in forward(), where a
        clamp would stop its gradient and keep it at 100 for good."""
        self.log_logit_scale.clamp_(max=math.log(100))


def build_model(args, num_classes, image_size, head):
    """head: [C, D] prototypes from --head-file, or None for a randomly initialised learnable head."""
    dim = head.shape[1] if head is not None else (args.embed_dim or 1024)
    if args.embed_dim and args.embed_dim != dim:
        raise ValueError(f"--embed-dim {args.embed_dim} differs from the head file's dimension {dim}")
    if image_size % 32:
        raise ValueError(f"image size {image_size} is not a multiple of 32 (CLIP's ResNet downsamples x32)")
    spec = MODELS[args.model]
    encoder = ModifiedResNet(spec["layers"], output_dim=dim, heads=spec["width"] * 32 // 64,
                             image_size=image_size, width=spec["width"])
    if head is None:
        head = torch.randn(num_classes, dim) * dim ** -0.5
    return PrototypeClassifier(encoder, head.float(), train_head=args.head != "frozen")


# ---- Vocabulary subsampling (Sec. 3.3) --------------------------------------------------------------

def vocabulary_weights(train_counts, how):
    """Weight of each class when filling the vocabulary: its training frequency (the paper's default),
    the square root of it, or uniform (only then can classes never seen in training be drawn)."""
    counts = torch.as_tensor(np.asarray(train_counts), dtype=torch.float64)
    return {"freq": counts, "sqrt": counts.sqrt(), "uniform": torch.ones_like(counts)}[how]


def sample_vocabulary(batch_labels, size, weights, generator):
    """The classes one iteration's softmax competes over (Sec. 3.3): the batch's classes, filled up to
    `size` with other classes drawn without replacement with probability proportional to `weights`.
    When the batch already holds `size` classes or more, the vocabulary is just the batch's classes.
    Returns the sorted class ids."""
    in_batch = torch.unique(batch_labels.cpu())
    fill_weights = weights.clone()
    fill_weights[in_batch] = 0
    n_fill = min(size - len(in_batch), int((fill_weights > 0).sum()))
    if n_fill <= 0:
        return in_batch
    drawn = torch.multinomial(fill_weights, n_fill, replacement=False, generator=generator)
    return torch.cat([in_batch, drawn]).sort().values


def vocabulary_generator(seed, epoch, step, rank):
    """A generator keyed by (seed, epoch, step, rank): the draws need no saved state to resume."""
    key = np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(key))


def iteration_vocabularies(labels, args, weights, dist, epoch, step):
    """[(rows, idx)]: the vocabulary idx the images `rows` of this rank's batch compete over this iteration.
    --voc-images N: one per N consecutive images, keyed by the group's place in the global batch (as many
    per-GPU draws as the paper's code makes), so the draws do not depend on the process count. Otherwise one
    for the whole batch: --voc-scope global, every rank draws from the gathered global batch with the same
    generator; local, each rank from its own labels."""
    if args.voc == 0:
        return [(slice(None), torch.arange(len(weights)))]
    if args.voc_images:
        n = args.voc_images
        groups_per_rank = len(labels) // n
        return [(slice(j * n, (j + 1) * n),
                 sample_vocabulary(labels[j * n:(j + 1) * n], args.voc, weights,
                                   vocabulary_generator(args.seed, epoch, step, dist.rank * groups_per_rank + j)))
                for j in range(groups_per_rank)]
    rank = dist.rank
    if args.voc_scope == "global":
        labels, rank = runtime.all_gather_cat(labels, dist), 0
    return [(slice(None), sample_vocabulary(labels, args.voc, weights, vocabulary_generator(args.seed, epoch, step,
                                                                                          rank)))]


def check_same_vocabulary(idx, dist):
    """Debug check (CLIP_TAIL_DEBUG=1) that every rank holds the same vocabulary under --voc-scope global."""
    gathered = runtime.all_gather_cat(idx, dist).cpu().view(dist.world_size, -1)  # equal lengths if equal sets
    if not (gathered == gathered[0]).all():
        raise AssertionError(f"ranks drew different vocabularies: {gathered.tolist()}")


# ---- Losses: the paper's (CE over the vocabulary) and long-tail baselines ---------------------------

def positions_in_vocabulary(labels, idx):
    """Class ids -> their positions in the sorted vocabulary idx (the targets of a [B, V] softmax)."""
    pos = torch.searchsorted(idx, labels).clamp(max=len(idx) - 1)
    if not (idx[pos] == labels).all():
        raise ValueError("a label is missing from the vocabulary")
    return pos


def vocabulary_loss(features, prototypes, idx, labels, logit_scale, args, log_prior):
    """Mean cross-entropy of the batch over the vocabulary idx (the fused op; no [B, C] logits)."""
    if args.loss == "ce":
        return proto_ce.proto_cross_entropy(features, prototypes, idx, labels, logit_scale)
    # The baselines add a per-class term to each logit (Balanced Softmax, Ren et al. 2020; logit
    # adjustment, Menon et al. 2021) or reweight each sample by its confidence (focal loss, Lin et al. 2017).
    # The fused op takes neither, so these form the [B, V] logits in plain PyTorch.
    logits = logit_scale * features @ prototypes[idx].T
    targets = positions_in_vocabulary(labels, idx)
    if args.loss in ("balanced-softmax", "logit-adjust"):
        tau = 1.0 if args.loss == "balanced-softmax" else args.la_tau
        return F.cross_entropy(logits + tau * log_prior[idx], targets)
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    return (-(1 - log_p.exp()).pow(args.focal_gamma) * log_p).mean()


def log_class_prior(train_counts):
    """log of the training class prior; a class never seen counts as seen once, to stay finite."""
    counts = torch.as_tensor(np.asarray(train_counts), dtype=torch.float32).clamp(min=1)
    return (counts / counts.sum()).log()


def class_balanced_indices(labels, seed, epoch):
    """Class-balanced re-sampling (baseline): len(labels) draws, each a class uniformly among those with
    samples and then one of its samples uniformly. One list per (seed, epoch): the same for any number of
    processes and after a resume."""
    rng = np.random.default_rng([seed, epoch, 1])
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    k = rng.integers(len(classes), size=len(labels))
    return order[starts[k] + (rng.random(len(labels)) * counts[k]).astype(np.int64)].tolist()


# ---- Evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, dataset, dist, args, log_prior):
    """Features and predictions over all C classes on the balanced test set, in dataset order."""
    loader = runtime.eval_loader(dataset, args.eval_batch_size, dist, args.workers)
    model.eval()
    features, preds, labels = [], [], []
    for images, y in loader:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=args.amp):
            f, w, scale = model(images.to(dist.device, non_blocking=True))
        logits = scale * f @ w.T - args.posthoc_tau * log_prior.to(f.device)  # post-hoc adjustment (Menon et al.)
        features.append(f.cpu())
        preds.append(logits.argmax(1).cpu())
        labels.append(y)
    if not features:  # a rank with an empty shard still takes part in the gathers
        features.append(torch.zeros(0, model.prototypes.shape[1]))
        preds.append(torch.zeros(0, dtype=torch.long))
        labels.append(torch.zeros(0, dtype=torch.long))
    return runtime.gather_eval(loader.shard, dist, torch.cat(features), torch.cat(preds), torch.cat(labels))


def affinity_class_sample(num_classes, train_counts, tail_classes, k):
    """Classes for the head's affinity matrix (Fig. 9a): the trimmed tail classes (up to k/2), then other
    classes evenly spaced along the frequency ranking."""
    tail = [] if tail_classes is None else [int(c) for c in np.asarray(tail_classes).reshape(-1)][: k // 2]
    others = [c for c in np.argsort(-np.asarray(train_counts), kind="stable").tolist() if c not in tail]
    n_other = min(k - len(tail), len(others))
    picks = np.linspace(0, len(others) - 1, n_other).round().astype(int) if n_other > 0 else []
    return tail + [others[i] for i in picks]


# ---- The run ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    dist = runtime.init_distributed(args.device, args.amp)
    runtime.check_batch_split(args.batch_size, dist)
    if args.voc_images and (args.batch_size // dist.world_size) % args.voc_images:
        raise ValueError(f"--voc-images {args.voc_images} does not divide the {args.batch_size // dist.world_size} "
                         "images of each process's batch")
    longtail = data.load_data(args)
    train_set = longtail.train_labelled()  # open-world samples (label -1) have no class to learn (Sec. 3.6)
    num_classes = len(longtail.classnames)
    if args.voc > num_classes:
        raise ValueError(f"--voc {args.voc} is larger than the {num_classes} classes")
    head = None
    if args.head != "learnable":
        head = classes.load_head(args.head_file, longtail.imagenet_ids, longtail.classnames)
        if head.shape[0] != num_classes:
            raise ValueError(f"head {args.head_file} has {head.shape[0]} classes, the data has {num_classes}")
    image_size = longtail.test[0][0].shape[-1]
    run_dir = runtime.RunDir(args.out, args, dist, resume=args.resume, identity=data.data_identity(longtail))

    runtime.seed_everything(args.seed)
    model = build_model(args, num_classes, image_size, head)
    model = runtime.channels_last(runtime.sync_batchnorm(model, dist).to(dist.device))
    raw_model = model
    if dist.world_size > 1:
        # the buffers (BatchNorm statistics, a frozen head) stay identical on every rank (synchronised
        # BatchNorm updates them alike), so DDP need not re-send them, the [C, D] head included, every step
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None, broadcast_buffers=False)
    # SGD (momentum as the released code runs it; --nesterov as Appx. C.1 says), cosine or step decay x0.1;
    # no weight decay on the temperature
    scale_params = [raw_model.log_logit_scale]
    other_params = [p for p in raw_model.parameters() if p.requires_grad and p is not raw_model.log_logit_scale]
    optimizer = torch.optim.SGD([{"params": other_params}, {"params": scale_params, "weight_decay": 0.0}],
                                lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov)
    if args.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_steps, gamma=0.1)

    weights = vocabulary_weights(longtail.train_counts, args.voc_sampling)
    log_prior = log_class_prior(longtail.train_counts).to(dist.device)
    start_epoch, voc_total, steps_total = 0, 0.0, 0
    state = run_dir.resume_state() if args.resume else None
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        runtime.set_rng_state(state["rng"])
        start_epoch, voc_total, steps_total = state["epoch"], state["voc_total"], state["steps_total"]
        if dist.is_main:
            print(f"resumed {args.out} at epoch {start_epoch}")
    debug = bool(os.environ.get("CLIP_TAIL_DEBUG"))

    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        train_set.set_epoch(epoch)  # per-sample augmentation is keyed by (data seed, epoch, index)
        indices = class_balanced_indices(train_set.labels, args.seed, epoch) if args.sampler == "class-balanced" else None
        loader = runtime.train_loader(train_set, args.batch_size, dist, args.seed, epoch, args.workers, indices=indices)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        sums = torch.zeros(3, dtype=torch.float64)  # loss, vocabulary size, steps
        for step, (images, labels, _) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}",
                                                        disable=not dist.is_main, leave=False)):
            images, labels = images.to(dist.device, non_blocking=True), labels.to(dist.device)
            vocabularies = iteration_vocabularies(labels, args, weights, dist, epoch, step)
            if debug and args.voc_scope == "global" and not args.voc_images and dist.world_size > 1:
                check_same_vocabulary(vocabularies[0][1], dist)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=args.amp):
                features, prototypes, logit_scale = model(images)
            # equal groups: the mean of their mean losses is the mean over the batch
            loss = sum(vocabulary_loss(features[rows], prototypes, idx.to(dist.device), labels[rows], logit_scale,
                                       args, log_prior) for rows, idx in vocabularies) / len(vocabularies)
            voc_size = float(np.mean([len(idx) for _, idx in vocabularies]))
            global_loss = loss.detach().clone()
            if dist.world_size > 1:  # every rank sees the same value, so a NaN stops all of them together
                torch.distributed.all_reduce(global_loss)
                global_loss /= dist.world_size
            runtime.check_finite(global_loss, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            raw_model.cap_logit_scale()
            sums += torch.tensor([global_loss.item(), voc_size, 1], dtype=torch.float64)
        scheduler.step()

        if dist.world_size > 1:  # the vocabulary size differs across ranks under --voc-scope local
            voc_sizes = sums[1:2].to(dist.device)
            torch.distributed.all_reduce(voc_sizes)
            sums[1] = voc_sizes.item() / dist.world_size
        voc_total, steps_total = voc_total + sums[1].item(), steps_total + int(sums[2])
        record = dict(epoch=epoch, loss=sums[0].item() / sums[2].item(), lr=lr,
                      voc_effective=sums[1].item() / sums[2].item(),
                      logit_scale=raw_model.log_logit_scale.exp().item(), time=time.time() - start)
        run_dir.log_epoch(record)
        run_dir.save(dict(epoch=epoch + 1, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                          scheduler=scheduler.state_dict(), rng=runtime.rng_state(), voc_total=voc_total,
                          steps_total=steps_total))
        if dist.is_main:
            print(f"epoch {epoch + 1}/{args.epochs} loss {record['loss']:.4f} lr {lr:.4g} "
                  f"voc {record['voc_effective']:.1f} scale {record['logit_scale']:.2f} {record['time']:.0f}s")
            if epoch == start_epoch and 0 < args.voc and record["voc_effective"] > 1.1 * args.voc:
                print(f"warning: the vocabularies averaged {record['voc_effective']:.0f} classes, more than --voc "
                      f"{args.voc}: a vocabulary always holds its batch's classes, and these batches hold more. "
                      "Fewer images per vocabulary (--voc-images, --voc-scope local under torchrun, or a smaller "
                      "--batch-size) "
                      "let --voc act", file=sys.stderr)

    prototypes = F.normalize(raw_model.prototypes.detach().float(), dim=-1).cpu()
    extra = dict(voc_effective=voc_total / max(steps_total, 1),
                 logit_scale=raw_model.log_logit_scale.exp().item(), epochs=args.epochs)
    for name, dataset in sorted(longtail.extra_eval.items()):  # --extra-eval NAME=DIR, e.g. ImageNet-V2
        features, preds, labels = evaluate(raw_model, dataset, dist, args, log_prior)
        if dist.is_main:
            extra.update(metrics.write_extra_eval_outputs(args.out, name, preds, labels, longtail.train_counts,
                                                          longtail.classnames, features, prototypes,
                                                          longtail.tail_classes))
    features, preds, labels = evaluate(raw_model, longtail.test, dist, args, log_prior)
    if dist.is_main:  # final.json last: run_all.sh counts a run with it as finished
        sample = affinity_class_sample(num_classes, longtail.train_counts, longtail.tail_classes,
                                       args.affinity_classes)
        np.savez(os.path.join(args.out, "affinity.npz"), classes=np.array(sample, dtype=np.int64),
                 classnames=np.array([longtail.classnames[c] for c in sample]),
                 is_tail=np.isin(sample, [] if longtail.tail_classes is None else longtail.tail_classes),
                 affinity=metrics.affinity_matrix(prototypes, sample))
        final = metrics.write_eval_outputs(args.out, preds, labels, longtail.train_counts, longtail.classnames,
                                           features=features, classifier=prototypes,
                                           tail_classes=longtail.tail_classes, extra=extra)
        shown = ["top1", "corr_acc", "corr_pred", "top1_tail", "top1_other", "voc_effective"]
        print("final: " + " ".join(f"{k} {final[k]:.4f}" for k in shown if final.get(k) is not None))


if __name__ == "__main__":
    runtime.run_cli(main)
