"""Calibrate the synthetic world's difficulty (DESIGN.md, "The embedded default").

Trains the same small CNN (open_clip's ModifiedResNet, layers [1,1,1,1], width 32, + linear head, plain
cross-entropy, Adam) twice on worlds of the same size -- one with uniform class counts, one long-tailed
(--profile) -- and prints, on the balanced test split:
  - top-1 of the balanced-trained and of the long-tailed-trained model, and the long-tailed model's
    top-1 on the most / least frequent third of the classes;
  - Spearman of the long-tailed model's per-class prediction counts vs class frequency (head bias);
  - the fraction of errors that go to one of the 5 nearest classes by text-embedding similarity
    (chance would be 5 / (C-1)).
Also the time to load/render each world. The README's numbers come from
    python benchmarks/calibrate_world.py --epochs 4
(one torch thread; 9-18 min per model on the shared 2-core CPU, --only runs one of the two).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import classes  # noqa: E402
import data  # noqa: E402


def small_cnn(num_classes, image_size):
    from open_clip.modified_resnet import ModifiedResNet

    trunk = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=128, heads=2, image_size=image_size, width=32)
    return torch.nn.Sequential(trunk, torch.nn.Linear(128, num_classes))


def train_and_predict(d, epochs, batch_size, lr, seed):
    """Plain CE training on d.train (labelled samples), predictions on d.test."""
    torch.manual_seed(seed)
    model = small_cnn(len(d.classnames), d.test[0][0].shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train = d.train_labelled()
    loader_gen = torch.Generator().manual_seed(seed)
    steps = epochs * (len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                                             generator=loader_gen)
        model.train()
        t0, total = time.time(), 0.0
        for x, y, _ in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"  epoch {epoch}: loss {total / len(loader):.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(d.test, batch_size=500):
            preds.append(model(x).argmax(1))
            labels.append(y)
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def nearest_classes(d, head, k=5):
    e = classes._embeddings(head)[d.imagenet_ids]
    sim = e @ e.T
    sim.fill_diagonal_(-2)
    return sim.topk(k, dim=1).indices.numpy()


def report(name, d, preds, labels, near):
    C = len(d.classnames)
    acc = (preds == labels).mean()
    pred_counts = np.bincount(preds, minlength=C)
    per_class = np.array([(preds[labels == c] == c).mean() for c in range(C)])
    wrong = preds != labels
    near_frac = np.mean([preds[i] in near[labels[i]] for i in np.flatnonzero(wrong)])
    order = np.argsort(-d.train_counts, kind="stable")
    third = C // 3
    print(f"{name}: top-1 {100 * acc:.1f}% | head third {100 * per_class[order[:third]].mean():.1f}% "
          f"tail third {100 * per_class[order[-third:]].mean():.1f}% | "
          f"Spearman(pred count, freq) {spearmanr(pred_counts, d.train_counts).statistic:.2f} | "
          f"Spearman(acc, freq) {spearmanr(per_class, d.train_counts).statistic:.2f} | "
          f"errors to 5 nearest classes {100 * near_frac:.0f}% (chance {100 * 5 / (C - 1):.0f}%)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data.add_data_args(p)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--only", choices=["balanced", "long-tailed"], default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = [("balanced", "uniform"), ("long-tailed", args.profile)]
    for name, profile in runs:
        if args.only and name != args.only:
            continue
        args_run = argparse.Namespace(**{**vars(args), "profile": profile})
        t0 = time.time()
        d = data.load_data(args_run)
        print(f"{name} world ({profile}, {len(d.train)} train / {len(d.test)} test images, "
              f"counts {d.train_counts.min()}..{d.train_counts.max()}): loaded in {time.time() - t0:.1f} s", flush=True)
        t0 = time.time()
        preds, labels = train_and_predict(d, args.epochs, args.batch_size, args.lr, args.seed)
        print(f"  trained {args.epochs} epochs in {time.time() - t0:.0f} s")
        report(name, d, preds, labels, nearest_classes(d, args.world_head))


if __name__ == "__main__":
    main()
