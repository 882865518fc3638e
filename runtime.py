"""Run machinery the three experiment scripts share: processes (torch.distributed, NCCL or gloo),
BatchNorm over the global batch, deterministic global batches and evaluation shards, gathering, RNG
state, atomic files and checkpoints, the run folder (RunDir), and the scripts' argument parser and
one-line errors (run_cli).

Two promises hold for every script in the same way because they live here: N processes with the same
global batch give the numbers one process gives (up to reduction order), and --resume continues exactly
where an uninterrupted run would be.
"""
import argparse
import json
import math
import os
import random
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

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


def channels_last(model):
    """The model's convolution weights in channels-last memory format; its activations follow. The image
    towers' convolutions run faster so: 22 % less time per step for the RN-tiny tower at batch 128 on a
    2-core AVX-512 CPU (oneDNN), and channels-last is what tensor-core convolutions want under --amp.
    Values are unchanged up to float rounding; checkpoints load into either format."""
    return model.to(memory_format=torch.channels_last)


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
    overwrites a finished run. Given the identity of the run's data (data.data_identity), checkpoints record
    it and a resume on other data is refused.
    """

    def __init__(self, out, args, dist, resume=False, identity=None):
        self.out, self.dist = out, dist
        self.identity = identity
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
