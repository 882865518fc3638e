"""DINO on long-tailed data with prototype subsampling, and linear-probe transfer.

Wen et al., "Generalization Beyond Data Imbalance: A Controlled Study on CLIP for Transferable Insights"
(NeurIPS 2024, arXiv 2405.21070), Sec. 4.2 and Appx. D. DINO's self-distillation objective is a
cross-entropy between a teacher and a student softmax over K = 65,536 learnable prototypes. On
imbalanced data (LAIONet) its prototypes collapse onto the head concepts; the paper transfers CLIP's
insight -- a pretext task over a small, changing vocabulary -- to DINO: each iteration the loss uses only
a uniformly drawn subset of V prototypes, the same for teacher and student (`sample_prototypes`). Its
Table 2 shows that this narrows the linear-probe transfer gap between imbalanced and ImageNet
pre-training, and that a plain smaller head (K = 16,384) is worse than subsampling 16,384 of 65,536.

    python dino_tail.py                              # embedded synthetic world, vanilla DINO (--voc 0)
    python dino_tail.py --voc 1024                   # prototype subsampling: 1024 of K per iteration
    python dino_tail.py --prototypes 1024            # a plain smaller head
    python dino_tail.py --profile uniform            # a balanced world of the same size
    torchrun --nproc_per_node=8 dino_tail.py --recipe paper --data imagefolder --data-root LAIONET \
        --voc 16384 --transfer cifar10,cifar100,dtd --transfer-root DOWNSTREAM

The loss runs through the fused op proto_ce.dino_proto_loss (it never builds [rows, K] logits); the
teacher and the student use the same idx, the centre is updated on the sampled columns only.
Outputs in --out: args.json, log.jsonl, checkpoint.pt, final.json (probe results per transfer task,
prototype utilisation), and eval.npz / per_class.csv of the first transfer task's probe.
"""
import argparse
import contextlib
import copy
import math
import os
import time

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other processes, spinning threads
# made this run ~8x slower (measured on a 2-core machine running other jobs). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402 (after the OpenMP setting, which must precede torch's import)
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import metrics  # noqa: E402
import proto_ce  # noqa: E402
import runtime  # noqa: E402
import sources  # noqa: E402

# Appx. D.2 (the paper's DINO recipe; unlisted values are DINO's defaults) and a scaled-down default that
# trains the embedded synthetic world, probe included, in under 10 minutes on a 2-core CPU.
# Explicit flags override these.
RECIPES = {
    "paper": dict(model="rn50", epochs=100, batch_size=1024, base_lr=0.03, min_lr=1e-6, weight_decay=1e-4,
                  warmup_epochs=10, prototypes=65536, hidden_dim=2048, teacher_momentum=0.996,
                  global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), local_crops=8, global_size=224,
                  local_size=96, workers=10, freeze_last_layer=1, crop_interpolation="bicubic",
                  photometric="dino"),
    "default": dict(model="rn-small", epochs=6, batch_size=64, base_lr=0.03, min_lr=1e-6, weight_decay=1e-4,
                    warmup_epochs=1, prototypes=4096, hidden_dim=512, teacher_momentum=0.99,
                    global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), local_crops=2, global_size=32,
                    local_size=32, workers=0, freeze_last_layer=0, crop_interpolation="bilinear",
                    photometric="none"),
}
# CLIP's modified ResNet (open_clip): RN50 for the paper recipe, a small one for 32 px images.
MODELS = {"rn50": dict(layers=[3, 4, 6, 3], width=64, output_dim=1024),
          "rn-small": dict(layers=[1, 1, 1, 1], width=16, output_dim=256)}


def _pair(text):
    lo, hi = (float(v) for v in text.split(","))
    if not 0 < lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"crop scale must be 'lo,hi' with 0 < lo <= hi <= 1, got {text!r}")
    return lo, hi


def parse_args(argv=None):
    p = runtime.ArgumentParser(description="DINO with prototype subsampling and linear-probe transfer (Sec. 4.2)")
    p.add_argument("--out", default="runs/dino_tail", help="run directory (args.json, log.jsonl, final.json, ...)")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order and prototype draws")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="paper = Appx. D.2")
    p.add_argument("--model", default=None, choices=sorted(MODELS))
    p.add_argument("--epochs", type=int, default=None, help="pre-training epochs; 0 = none: the probe of a "
                   "randomly initialised backbone (what pre-training adds is measured against it)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (images) over all processes")
    p.add_argument("--lr", type=float, default=None, help="peak lr; default: base lr 0.03 x batch-size / 256")
    p.add_argument("--min-lr", type=float, default=None, help="end of the cosine schedule")
    p.add_argument("--warmup-epochs", type=int, default=None, help="linear lr warm-up")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter gradient-norm clip (DINO); 0 = off")
    p.add_argument("--freeze-last-layer", type=int, default=None,
                   help="epochs the prototypes stay fixed (paper recipe: 1, DINO's default; default recipe: 0)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for backbone and head (loss in float32)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g = p.add_argument_group("DINO")
    g.add_argument("--prototypes", type=int, default=None, help="K, prototypes of the head (paper 65536; "
                   "16384 = the plain smaller head of Table 2)")
    g.add_argument("--voc", type=int, default=0, help="prototypes drawn per iteration (Sec. 4.2); 0 = all K")
    g.add_argument("--hidden-dim", type=int, default=None, help="width of the head's MLP")
    g.add_argument("--bottleneck-dim", type=int, default=256, help="l2-normalised embedding the prototypes score")
    g.add_argument("--student-temp", type=float, default=0.1)
    g.add_argument("--teacher-temp", type=float, default=0.04)
    g.add_argument("--teacher-momentum", type=float, default=None, help="EMA start; cosine schedule to 1")
    g.add_argument("--center-momentum", type=float, default=0.9)
    g.add_argument("--teacher", default="sinkhorn", choices=["sinkhorn", "softmax"],
                   help="teacher targets: Sinkhorn-Knopp, as the authors' released main_dino.py computes them in "
                   "every run (default), or DINO's centred softmax (--center-momentum; with --voc only the sampled "
                   "columns' centre moves, the others keep their last value)")
    g.add_argument("--sinkhorn-iters", type=int, default=3)
    g.add_argument("--global-scale", type=_pair, default=None, help="RandomResizedCrop scale of the 2 global crops")
    g.add_argument("--local-scale", type=_pair, default=None, help="RandomResizedCrop scale of the local crops")
    g.add_argument("--local-crops", type=int, default=None, help="number of local crops")
    g.add_argument("--crop-interpolation", default=None, choices=["bicubic", "bilinear"],
                   help="resampling of the crops (paper recipe: bicubic, DINO's; default recipe: bilinear, which "
                   "the README's synthetic-world numbers used)")
    g.add_argument("--photometric", default=None, choices=["dino", "none"],
                   help="colour jitter, greyscale, blur and solarisation of the crops: DINO's (paper recipe), or none "
                   "(default recipe: with them, DINO on the 32-px world learns nothing in a CPU budget, its loss "
                   "staying at 0.99 log K; multi-crop alone it learns)")
    g.add_argument("--global-size", type=int, default=None, help="global crop resolution")
    g.add_argument("--local-size", type=int, default=None, help="local crop resolution")
    g.add_argument("--utilisation-eps", type=float, default=0.025,
                   help="prototypes with cosine above 1 - eps count as one (near-duplicates)")
    g = p.add_argument_group("linear-probe transfer (Appx. D.3)")
    g.add_argument("--transfer", default=None, help="comma-separated tasks. Synthetic world: 'novel' (classes "
                   "not used in pre-training) and 'seen' (the pre-training classes, balanced); default both. "
                   "Real data: torchvision names (cifar10, cifar100, dtd, flowers102, food101, oxford_pets, "
                   "stanford_cars, fgvc_aircraft, caltech101, sun397, voc2007; birdsnap: Birdsnap 1.1's release with its "
                   "downloaded images) under --transfer-root/<name>, "
                   "or folder:PATH (ImageFolders PATH/train, PATH/test, optional PATH/val); 'none' = skip")
    g.add_argument("--transfer-root", default=None, help="folder holding the downstream data sets")
    g.add_argument("--probe-classes", type=int, default=100, help="synthetic 'novel': draw this many ImageNet "
                   "classes and keep those not used in pre-training")
    g.add_argument("--probe-train-per-class", type=int, default=24, help="synthetic tasks: probe training images "
                   "per class (20%% of them become the validation split)")
    g.add_argument("--probe-test-per-class", type=int, default=20)
    g.add_argument("--probe-max-iter", type=int, default=100, help="L-BFGS iterations per fit")
    g.add_argument("--probe-image-size", type=int, default=None,
                   help="probe and utilisation images are resized to this (default: --global-size)")
    data.add_data_args(p)
    # The embedded default world for DINO: 6000 images of the ImageNet-100 classes with LAIONet's class
    # frequencies (the imbalanced pre-training set of Sec. 4.2; --profile uniform gives the balanced one).
    p.set_defaults(num_train=6000, profile="laionet-0.7")
    args = p.parse_args(argv)

    recipe = RECIPES[args.recipe]
    for key, value in recipe.items():
        if key != "base_lr" and getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = recipe["base_lr"] * args.batch_size / 256  # DINO's linear scaling rule
    if args.epochs < 0:
        raise ValueError(f"--epochs must be >= 0 (0: no pre-training, the probe of a random backbone), got {args.epochs}")
    for name in ("batch_size", "prototypes", "hidden_dim", "bottleneck_dim", "global_size", "local_size",
                 "probe_train_per_class", "probe_test_per_class", "probe_max_iter"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.local_crops, args.warmup_epochs, args.voc, args.seed, args.freeze_last_layer) < 0:
        raise ValueError("--local-crops, --warmup-epochs, --voc, --seed and --freeze-last-layer must be >= 0")
    if args.sinkhorn_iters < 1:
        raise ValueError(f"--sinkhorn-iters must be >= 1, got {args.sinkhorn_iters}")
    if args.voc > args.prototypes:
        raise ValueError(f"--voc {args.voc} is larger than the {args.prototypes} prototypes")
    if min(args.lr, args.student_temp, args.teacher_temp) <= 0:
        raise ValueError("--lr, --student-temp and --teacher-temp must be positive")
    if not 0 <= args.teacher_momentum <= 1 or not 0 <= args.center_momentum <= 1:
        raise ValueError("--teacher-momentum and --center-momentum must lie in [0, 1]")
    transfer_tasks(args)  # validates --transfer
    if args.global_size % 32 or args.local_size % 32:
        raise ValueError(f"crop sizes must be multiples of 32 (the ResNet's stride), got {args.global_size} "
                         f"and {args.local_size}")
    if args.extra_eval:
        raise ValueError("--extra-eval: dino_tail.py evaluates by linear probes (--transfer), not on test sets")
    if not (0 <= args.utilisation_eps <= 2 and 0 <= args.min_lr <= args.lr and args.clip_grad >= 0):
        raise ValueError("--utilisation-eps must be in [0, 2], --min-lr in [0, --lr], --clip-grad >= 0")
    if args.epochs and (args.warmup_epochs > args.epochs or args.freeze_last_layer > args.epochs):
        raise ValueError(f"--warmup-epochs and --freeze-last-layer must not exceed --epochs {args.epochs}")
    if args.probe_image_size is not None and args.probe_image_size < 32:
        raise ValueError(f"--probe-image-size must be >= 32 (the ResNet's stride), got {args.probe_image_size}")
    return args


def transfer_tasks(args):
    """The --transfer list, checked (synthetic-world tasks novel and seen, or real sets under --transfer-root)."""
    tasks = sources.transfer_task_names(args.transfer, args.data == "synthetic", args.transfer_root)
    if "novel" in tasks and not 1 <= args.probe_classes <= 1000:
        raise ValueError(f"--probe-classes must be in [1, 1000], got {args.probe_classes}")
    return tasks


# ---- Model: CLIP's ModifiedResNet + DINO head -----------------------------------------------------------

class ResizableAttentionPool2d(AttentionPool2d):
    """open_clip's attention pooling with its positional embedding interpolated (bicubic) to the input grid:
    DINO's local crops have a lower resolution than the global crops the pooling was built for."""

    def forward(self, x):
        n, c, h, w = x.shape
        pos = self.positional_embedding
        grid = int(round((pos.shape[0] - 1) ** 0.5))
        if (h, w) != (grid, grid):
            spatial = pos[1:].reshape(1, grid, grid, c).permute(0, 3, 1, 2)
            spatial = F.interpolate(spatial, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:1], spatial.permute(0, 2, 3, 1).reshape(h * w, c)])
        x = x.reshape(n, c, h * w).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pos[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=c, num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training,
            need_weights=False)
        return x[0]


def build_backbone(name, image_size):
    cfg = MODELS[name]
    backbone = ModifiedResNet(layers=cfg["layers"], output_dim=cfg["output_dim"], heads=cfg["width"] * 32 // 64,
                              image_size=image_size, width=cfg["width"])
    pool = backbone.attnpool
    resizable = ResizableAttentionPool2d(image_size // 32, cfg["width"] * 32, pool.num_heads, cfg["output_dim"])
    resizable.load_state_dict(pool.state_dict())  # keep open_clip's initialisation
    backbone.attnpool = resizable
    return backbone


class DINOHead(nn.Module):
    """MLP -> l2-normalised bottleneck embedding; the K prototypes are rows of a weight-normalised matrix
    (DINO's weight_norm last layer with its gain fixed to 1), so a logit is a cosine."""

    def __init__(self, in_dim, num_prototypes, hidden_dim, bottleneck_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, bottleneck_dim))  # directions uniform

    def forward(self, x):
        return F.normalize(self.mlp(x), dim=-1)

    def normalised_prototypes(self):
        return F.normalize(self.prototypes, dim=-1)


class DINOModel(nn.Module):
    """Backbone + head over DINO's multi-crop list: crops of one resolution go through the backbone as one
    batch. Returns the embeddings of all crops, crop-major ([n_crops*b, D]), and the prototypes [K, D]."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features)), self.head.normalised_prototypes()


def build_model(args):
    backbone = build_backbone(args.model, args.global_size)
    return DINOModel(backbone, DINOHead(MODELS[args.model]["output_dim"], args.prototypes, args.hidden_dim,
                                        args.bottleneck_dim))


# ---- Multi-crop augmentation (DINO) ---------------------------------------------------------------------
# Per sample (in the dataset, seeded by data seed, epoch and index): the geometric crops and the photometric
# parameters. Per batch (on the device): the photometric operations, vectorised over the batch -- torchvision's
# per-image colour ops cost ~20 ms per 32 px image on a CPU, which would dominate a small DINO run.

PHOTO_PARAMS = 8  # jitter on, brightness, contrast, saturation, hue, grayscale, blur sigma, solarize


class MultiCropTransform:
    """image -> (2 global + L local crops as float tensors in [0, 1], their photometric parameters [n, 8])."""

    def __init__(self, global_scale, local_scale, local_crops, global_size, local_size, interpolation="bilinear"):
        self.interpolation = T.InterpolationMode(interpolation)
        self.specs = ([(global_scale, global_size, 1.0, 0.0), (global_scale, global_size, 0.1, 0.2)]
                      + [(local_scale, local_size, 0.5, 0.0)] * local_crops)  # (scale, size, p_blur, p_solarize)

    def __call__(self, image):
        if isinstance(image, torch.Tensor):
            image = image.float() / 255 if image.dtype == torch.uint8 else image
        else:
            image = T.functional.to_tensor(image.convert("RGB"))
        crops, params = [], []
        for scale, size, p_blur, p_solarize in self.specs:
            i, j, h, w = T.RandomResizedCrop.get_params(image, scale=scale, ratio=(3 / 4, 4 / 3))
            crop = T.functional.resized_crop(image, i, j, h, w, [size, size], self.interpolation, antialias=True)
            if torch.rand(()) < 0.5:
                crop = crop.flip(-1)
            u = torch.rand(8)
            sigma = (0.1 + 1.9 * u[6].item()) * size / 224 if u[7] < p_blur else 0.0  # PIL radius 0.1-2 at 224 px
            params.append(torch.tensor([float(u[0] < 0.8), 0.6 + 0.8 * u[1], 0.6 + 0.8 * u[2], 0.8 + 0.4 * u[3],
                                        -0.1 + 0.2 * u[4], float(u[5] < 0.2), sigma,
                                        float(torch.rand(()) < p_solarize)]))
            crops.append(crop.clamp(0, 1))
        return crops, torch.stack(params)


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def photometric_augment(x, params):
    """DINO's colour jitter (p 0.8; brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 in a fixed order, hue
    as a YIQ rotation), grayscale (p 0.2), Gaussian blur and solarisation, per image, then CLIP normalisation.
    x [n, 3, s, s] in [0, 1], params [n, 8] from MultiCropTransform."""
    col = lambda k: params[:, k].view(-1, 1, 1, 1)
    jitter = col(0) > 0
    y = (x * col(1)).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * col(2) + mean).clamp(0, 1)
    y = ((y - _gray(y)) * col(3) + _gray(y)).clamp(0, 1)
    angle = 2 * math.pi * params[:, 4]
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       dtype=x.dtype, device=x.device)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(len(x), 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    hue = torch.linalg.inv(yiq) @ rot @ yiq  # [n, 3, 3]
    y = torch.einsum("nij,njhw->nihw", hue, y).clamp(0, 1)
    x = torch.where(jitter, y, x)
    x = torch.where(col(5) > 0, _gray(x).expand_as(x), x)
    x = gaussian_blur(x, params[:, 6])
    x = torch.where((col(7) > 0) & (x >= 0.5), 1 - x, x)
    return clip_normalise(x)


def clip_normalise(x):
    """Crops [n, 3, s, s] in [0, 1] -> CLIP mean/std normalised (all of --photometric none)."""
    mean = torch.tensor(sources.CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(sources.CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def gaussian_blur(x, sigma):
    """Separable Gaussian blur with one sigma per image (0 = unchanged), as one grouped convolution."""
    n, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), (min(h, w) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.dtype).clamp_min(1e-3).view(n, 1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = torch.where(sigma.view(n, 1) > 0, kernel, (offsets == 0).to(x.dtype).expand(n, -1))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, 2r+1]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


# ---- Prototype subsampling (Sec. 4.2) -------------------------------------------------------------------

def prototype_generator(seed, epoch, step):
    """The generator of one iteration's draw: a function of (seed, epoch, step) only, so every rank, and a
    resumed run, draws the same subset without any communication."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, step, 8]).generate_state(1, np.uint64)[0] >> 1))
    return g


def sample_prototypes(num_prototypes, voc, generator):
    """The paper's idea: one uniform subset of V of the K prototypes for this iteration (sorted int64), shared
    by teacher and student. voc = 0 (or >= K) keeps all K."""
    if voc <= 0 or voc >= num_prototypes:
        return torch.arange(num_prototypes)
    return torch.randperm(num_prototypes, generator=generator)[:voc].sort().values


# ---- The DINO loss over the sampled prototypes -----------------------------------------------------------

@torch.no_grad()
def sinkhorn_centre(teacher_logits, tau_t, iters, dist):
    """Sinkhorn-Knopp teacher targets (SwAV), which the authors' released main_dino.py computes in place of
    DINO's centring, as a centre c [V]: over the teacher rows of the whole batch (all ranks), each iteration
    scales prototype j by a_j and each row by b_i, and the last step normalises every row, so row i's target
    is softmax_j((t_ij - c_j) / tau_t) with c_j = -tau_t log(prod a_j). DINO's centred teacher softmax with
    that centre, which the fused op computes without ever holding the student's [rows, V] logits."""
    t = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
    q = torch.exp((t - t.max()) / tau_t)  # [rows, V]; cosine logits: no underflow
    log_scale = torch.zeros(q.shape[1], dtype=q.dtype, device=q.device)
    for _ in range(iters):
        per_prototype = q.sum(dim=0)
        if dist.world_size > 1:  # (the max above differs by rank only by a factor that cancels in the rows)
            torch.distributed.all_reduce(per_prototype)
        per_prototype = per_prototype.clamp_min(torch.finfo(q.dtype).tiny)
        q /= per_prototype
        log_scale -= per_prototype.log()
        q /= q.sum(dim=1, keepdim=True)
    return -tau_t * log_scale


def dino_loss(student, teacher, w_student, w_teacher, idx, center, args, n_global, n_crops, dist):
    """Mean over (student view, other teacher global view) pairs of CE(teacher target, student softmax) over
    the columns idx (the fused op); also the teacher's raw logit sums over idx (for the centre). Teacher
    targets: Sinkhorn-Knopp (--teacher sinkhorn, the released code's every run) or DINO's centred softmax."""
    if args.teacher == "sinkhorn":
        with torch.no_grad():
            center = torch.zeros_like(center)
            centre = sinkhorn_centre(teacher @ w_teacher[idx].T, args.teacher_temp, args.sinkhorn_iters, dist)
            center[idx] = centre.to(center.dtype)
    return proto_ce.dino_proto_loss(student, teacher, w_student, w_teacher, idx, center, args.student_temp,
                                    args.teacher_temp, n_global, n_crops)


@torch.no_grad()
def update_center(center, idx, teacher_colsum, teacher_rows, momentum, dist):
    """DINO's centre is an EMA of the batch mean of the raw teacher logits; with subsampling only the sampled
    columns are observed, so only centre[idx] moves."""
    if dist.world_size > 1:
        torch.distributed.all_reduce(teacher_colsum)
    batch_mean = teacher_colsum / (teacher_rows * dist.world_size)
    center[idx] = center[idx] * momentum + batch_mean * (1 - momentum)


def cosine_schedule(start, end, total_steps, warmup_steps=0, warmup_start=0.0):
    """DINO's per-iteration schedule: linear warm-up, then half a cosine from start to end."""
    warm = np.linspace(warmup_start, start, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    t = np.arange(total_steps - len(warm))
    decay = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate([warm, decay])


def clip_gradients(model, clip):
    """DINO clips each parameter's gradient norm separately."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            p.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


# ---- Prototype utilisation (the collapse that motivates subsampling) ----------------------------------

def count_argmax_winners(winners, num_prototypes):
    """Distinct prototypes that win the teacher's argmax at least once."""
    return int((torch.bincount(winners.flatten().cpu(), minlength=num_prototypes) > 0).sum())


def count_distinct_prototypes(prototypes, eps=0.025, chunk=4096):
    """Prototypes left after merging near-duplicates: connected components of the graph 'cosine > 1 - eps'
    (union-find by min-label propagation with pointer jumping; labels only decrease, so it terminates)."""
    w = F.normalize(prototypes.detach().float(), dim=-1)
    k = len(w)
    label = torch.arange(k, device=w.device)
    while True:
        new = label.clone()
        for s in range(0, k, chunk):
            near = w[s:s + chunk] @ w.T > 1 - eps
            new[s:s + chunk] = torch.where(near, label[None, :], k).min(dim=1).values.minimum(new[s:s + chunk])
        new = new[new]
        if torch.equal(new, label):
            return int(torch.unique(label).numel())
        label = new


@torch.no_grad()
def prototype_utilisation(model, center, dataset, args, dist):
    """Teacher argmax winners over `dataset` (images without augmentation) and distinct prototypes."""
    model.eval()
    loader = runtime.eval_loader(dataset, 256, dist, args.workers)
    winners = []
    w = model.head.normalised_prototypes()
    for images, *_ in loader:
        emb = model.head(model.backbone(images.to(dist.device)))
        winners.append(((emb @ w.T) - center).argmax(dim=1))
    winners = torch.cat(winners) if winners else torch.zeros(0, dtype=torch.long, device=dist.device)
    (winners,) = runtime.gather_eval(loader.shard, dist, winners)
    return dict(argmax_winners=count_argmax_winners(winners, len(w)),
                distinct_prototypes=count_distinct_prototypes(w, args.utilisation_eps), prototypes=len(w))


# ---- Linear-probe transfer (Appx. D.3) -------------------------------------------------------------------
# As in ssl-transfer (the paper's evaluation code): frozen features, l2-regularised logistic regression
# (metrics.fit_logistic_regression, L-BFGS), lambda chosen from 45 log-spaced values in [1e-6, 1e5] on a
# validation split, then refitted on train + val. Multi-label sets (VOC2007): one-vs-rest, 11-point mAP.

@contextlib.contextmanager
def _one_cpu_thread(task):
    """Small probe problems on a CPU run single-threaded: OpenMP synchronisation costs more than it saves."""
    threads = torch.get_num_threads()
    x = task["train"][0]
    if x.device.type == "cpu" and x.numel() * task["num_classes"] < 2 ** 28:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def linear_probe(task, max_iter):
    """Select lambda on (train, val), refit on train + val, score on test."""
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = task["train"], task["val"], task["test"]
    c, metric = task["num_classes"], task["metric"]
    l2, val_scores = metrics.select_regularisation(x_tr, y_tr, x_val, y_val, c, metric, max_iter=max_iter)
    w, b = metrics.fit_logistic_regression(torch.cat([x_tr, x_val]), torch.cat([y_tr, y_val]), c, l2, metric == "map11",
                                   max_iter=max_iter)
    result = metrics.probe_scores(x_te, y_te, w, b, c, metric)
    result.update(metric=metric, l2=l2, best_val=max(val_scores), classes=c, train=len(x_tr), val=len(x_val),
                  test=len(x_te))
    return result, (x_te.double() @ w + b)


@torch.no_grad()
def extract_features(backbone, dataset, dist, workers, batch_size=256):
    """Frozen backbone features (attention-pool output) and labels of a dataset, in dataset order, all ranks."""
    backbone.eval()
    loader = runtime.eval_loader(dataset, batch_size, dist, workers)
    feats, labels = [], []
    for images, targets, *_ in loader:
        feats.append(backbone(images.to(dist.device)).float())
        labels.append(torch.as_tensor(targets).to(dist.device))
    feats = torch.cat(feats) if feats else torch.zeros(0, backbone.output_dim, device=dist.device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=dist.device)
    return runtime.gather_eval(loader.shard, dist, feats, labels)


def novel_probe_classes(data_seed, count):
    """The ImageNet classes 'novel' draws (sorted) before it drops those pre-training used."""
    return sorted(np.random.default_rng([data_seed, 7]).choice(1000, count, replace=False).tolist())


def novel_classes_left(args, pretrain):
    """The ImageNet classes of the 'novel' probe: its draw less those pre-training saw (its labelled classes
    and its open-world concepts). Fewer than two is an error."""
    seen = set(pretrain.imagenet_ids) | set(pretrain.open_world_ids)
    left = [c for c in novel_probe_classes(args.data_seed, args.probe_classes) if c not in seen]
    if len(left) < 2:
        raise ValueError(f"--probe-classes {args.probe_classes} leaves {len(left)} classes outside pre-training "
                         "for the 'novel' probe: draw more, or pre-train on fewer --classes")
    return left


def synthetic_transfer_task(name, args, pretrain, dist, backbone, eval_transform):
    """Tasks from the synthetic world: 'seen' = the pre-training classes on a balanced, freshly rendered set;
    'novel' = ImageNet classes the pre-training never saw, drawn by the data seed (same rendering rules)."""
    drawn = args.classes if name == "seen" else ",".join(map(str, novel_probe_classes(args.data_seed, args.probe_classes)))
    world = data.balanced_world(args, drawn, args.probe_train_per_class, args.probe_test_per_class, eval_transform)
    x_train, y_train = extract_features(backbone, world.train, dist, args.workers)
    x_test, y_test = extract_features(backbone, world.test, dist, args.workers)
    keep = np.arange(len(world.classnames))
    if name == "novel":  # (the world renders the whole draw; the probe keeps the classes pre-training never saw)
        keep = np.flatnonzero(np.isin(world.imagenet_ids, novel_classes_left(args, pretrain)))
    remap = torch.full((len(world.classnames),), -1, dtype=torch.long)
    remap[torch.as_tensor(keep)] = torch.arange(len(keep))
    y_train, y_test = remap[y_train.cpu()], remap[y_test.cpu()]
    x_train, x_test = x_train.cpu()[y_train >= 0], x_test.cpu()[y_test >= 0]
    y_train, y_test = y_train[y_train >= 0], y_test[y_test >= 0]
    tr, val = sources.seeded_split(len(y_train), args.seed)
    names = [world.classnames[c] for c in keep]
    counts = (pretrain.train_counts if name == "seen" else np.zeros(len(keep), dtype=np.int64))
    return dict(name=name, num_classes=len(keep), metric="top1", classnames=names, pretrain_counts=counts,
                train=(x_train[tr], y_train[tr]), val=(x_train[val], y_train[val]), test=(x_test, y_test))


def _rgb(image):
    return image.convert("RGB")


def probe_transform(args):
    """Images for the probes and the utilisation count, without augmentation, at the resolution the backbone
    trained at (--global-size; --probe-image-size overrides). Real images are resized (shorter side),
    centre-cropped and made RGB (Caltech101 holds greyscale images)."""
    size = args.probe_image_size or args.global_size
    if args.data == "synthetic":  # uint8 tensors rendered at 32 or 64 px
        _, normalize = sources.default_transforms(args.image_size or 32, tensor_images=True)
        rendered = args.image_size or 32
        return normalize if size == rendered else T.Compose([T.Resize(size, antialias=True), normalize])
    return T.Compose([T.Lambda(_rgb), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(sources.CLIP_MEAN, sources.CLIP_STD)])


def real_transfer_task(name, args, dist, backbone, transform):
    """A downstream set's features, kept on the run's device (the probe's fits run there)."""
    train, val, test = sources.transfer_splits(name, args.transfer_root, transform)
    on_device = lambda tensors: tuple(t.to(dist.device) for t in tensors)
    x_train, y_train = on_device(extract_features(backbone, train, dist, args.workers))
    x_test, y_test = on_device(extract_features(backbone, test, dist, args.workers))
    if val is None:
        tr, va = (torch.as_tensor(i, device=dist.device) for i in sources.seeded_split(len(y_train), args.seed))
        x_val, y_val, x_train, y_train = x_train[va], y_train[va], x_train[tr], y_train[tr]
    else:
        x_val, y_val = on_device(extract_features(backbone, val, dist, args.workers))
    metric = sources.PROBE_METRICS.get(name, "top1")
    num_classes = y_train.shape[1] if metric == "map11" else int(max(y_train.max(), y_test.max())) + 1
    names = getattr(getattr(train, "dataset", train), "classes", None) or [str(c) for c in range(num_classes)]
    return dict(name=name, num_classes=num_classes, metric=metric, classnames=list(names)[:num_classes],
                pretrain_counts=np.zeros(num_classes, dtype=np.int64), train=(x_train, y_train),
                val=(x_val, y_val), test=(x_test, y_test))


# ---- The run ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    dist = runtime.init_distributed(args.device, args.amp)
    runtime.check_batch_split(args.batch_size, dist)
    synthetic = args.data == "synthetic"
    tasks = transfer_tasks(args)
    sources.check_transfer_folders(tasks, args.transfer_root, warn=dist.is_main)
    multi_crop = MultiCropTransform(args.global_scale, args.local_scale, args.local_crops, args.global_size,
                                    args.local_size, args.crop_interpolation)
    eval_transform = probe_transform(args)
    longtail = data.load_data(args, train_transform=multi_crop, test_transform=eval_transform, need_test=False)
    if "novel" in tasks:
        novel_classes_left(args, longtail)  # checked now, not after pre-training
    train_set = longtail.train  # self-supervised: every image, open-world ones included; labels unused
    run_dir = runtime.RunDir(args.out, args, dist, resume=args.resume, identity=data.data_identity(longtail))

    runtime.seed_everything(args.seed)
    raw_model = runtime.channels_last(runtime.sync_batchnorm(build_model(args), dist).to(dist.device))
    teacher = copy.deepcopy(raw_model)  # starts as the student; BN in train mode (batch statistics) as in DINO
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = raw_model
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    center = torch.zeros(args.prototypes, device=dist.device)
    decay = [p for n, p in raw_model.named_parameters() if p.ndim > 1]  # DINO: no decay on biases and norms
    no_decay = [p for n, p in raw_model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0,
                                momentum=0.9, weight_decay=args.weight_decay)

    n_global, n_crops = 2, 2 + args.local_crops
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    total = args.epochs * steps_per_epoch
    lr_schedule = cosine_schedule(args.lr, args.min_lr, total, min(args.warmup_epochs, args.epochs) * steps_per_epoch)
    momentum_schedule = cosine_schedule(args.teacher_momentum, 1.0, total)

    start_epoch, final_loss = 0, None
    state = run_dir.resume_state() if args.resume else None
    if state is not None:
        final_loss = state.get("loss")
        raw_model.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        center.copy_(state["center"])
        runtime.set_rng_state(state["rng"])
        start_epoch = state["epoch"]
        if dist.is_main:
            print(f"resumed {args.out} at epoch {start_epoch}")

    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        train_set.set_epoch(epoch)  # per-sample crops are keyed by (data seed, epoch, index)
        loader = runtime.train_loader(train_set, args.batch_size, dist, args.seed, epoch, args.workers)
        model.train()
        sums = torch.zeros(2, dtype=torch.float64)
        for step, ((crops, params), _, _) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}",
                                                            disable=not dist.is_main, leave=False)):
            it = epoch * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule[it]
            params = params.to(dist.device)
            crops = [c.to(dist.device, non_blocking=True) for c in crops]
            if args.photometric == "none":  # (photometric_augment with every operation off, without its work)
                views = [clip_normalise(c) for c in crops]
            else:
                views = [photometric_augment(c, params[:, v]) for v, c in enumerate(crops)]
            idx = sample_prototypes(args.prototypes, args.voc, prototype_generator(args.seed, epoch, step))
            idx = idx.to(dist.device)
            with torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16, enabled=args.amp):
                with torch.no_grad():
                    teacher_emb, teacher_w = teacher(views[:n_global])
                student_emb, student_w = model(views)
            loss, colsum = dino_loss(student_emb.float(), teacher_emb.float(), student_w.float(), teacher_w.float(),
                                     idx, center, args, n_global, n_crops, dist)
            global_loss = loss.detach().clone()
            if dist.world_size > 1:
                torch.distributed.all_reduce(global_loss)
                global_loss /= dist.world_size
            runtime.check_finite(global_loss, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                clip_gradients(raw_model, args.clip_grad)
            if epoch < args.freeze_last_layer:
                raw_model.head.prototypes.grad = None
            optimizer.step()
            with torch.no_grad():  # teacher = EMA of the student, momentum on a cosine schedule to 1
                m = float(momentum_schedule[it])
                for p_t, p_s in zip(teacher.parameters(), raw_model.parameters()):
                    p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)
            if args.teacher == "softmax":  # (Sinkhorn-Knopp targets need no centre)
                update_center(center, idx, colsum.float(), teacher_emb.shape[0], args.center_momentum, dist)
            sums += torch.tensor([global_loss.item(), 1], dtype=torch.float64)

        record = dict(epoch=epoch, loss=sums[0].item() / sums[1].item(), lr=float(lr_schedule[it]),
                      teacher_momentum=float(momentum_schedule[it]), voc=len(idx), time=time.time() - start)
        run_dir.log_epoch(record)
        final_loss = record["loss"]
        run_dir.save(dict(epoch=epoch + 1, student=raw_model.state_dict(), teacher=teacher.state_dict(),
                          optimizer=optimizer.state_dict(), center=center, rng=runtime.rng_state(), loss=final_loss))
        if dist.is_main:
            print(f"epoch {epoch + 1}/{args.epochs} loss {record['loss']:.4f} lr {record['lr']:.4g} "
                  f"m {record['teacher_momentum']:.4f} voc {record['voc']} {record['time']:.0f}s")

    # Prototype utilisation over the training images (no augmentation), then linear-probe transfer.
    start = time.time()
    plain = data.load_data(args, train_transform=eval_transform, test_transform=eval_transform, need_test=False).train
    utilisation = prototype_utilisation(teacher, center, plain, args, dist)
    results, first = {}, None
    for name in tasks:
        task = (synthetic_transfer_task(name, args, longtail, dist, teacher.backbone, eval_transform) if synthetic
                else real_transfer_task(name, args, dist, teacher.backbone, eval_transform))
        if dist.is_main:
            with _one_cpu_thread(task):
                results[name], logits = linear_probe(task, args.probe_max_iter)
            print(f"probe {name}: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in results[name].items()))
            over_pretrain_classes = task["pretrain_counts"].any()  # per-class results vs frequency: preferred
            if task["metric"] != "map11" and (first is None or over_pretrain_classes and not first[0]["pretrain_counts"].any()):
                first = (task, logits.cpu())
    if dist.is_main:
        extra = dict(probe=results, utilisation=utilisation, epochs=args.epochs, voc=args.voc, final_loss=final_loss,
                     prototypes=args.prototypes, eval_time=time.time() - start,
                     probe_mean_score=float(np.mean([r["score"] for r in results.values()])) if results else None)
        if first is not None:  # the first task's probe predictions as eval.npz / per_class.csv
            task, logits = first
            final = metrics.write_eval_outputs(args.out, logits.argmax(1).numpy(), task["test"][1].cpu().numpy(),
                                               task["pretrain_counts"], task["classnames"],
                                               features=task["test"][0].cpu(), extra=dict(extra, eval_task=task["name"]))
        else:
            final = dict(extra)
            runtime.write_json(os.path.join(args.out, "final.json"), final)
        print(f"utilisation: {utilisation['argmax_winners']} argmax winners, {utilisation['distinct_prototypes']} "
              f"distinct of {utilisation['prototypes']} prototypes")


if __name__ == "__main__":
    runtime.run_cli(main)
