"""Time and memory of metrics.nc_metrics at ImageNet-val scale (issue 5: C = 1,000 classes, D = 1,024
dims, N = 50,000 samples must run in under a minute on 2 CPU cores).

    python benchmarks/bench_metrics.py                       # the issue's size, plus the numpy baseline
    python benchmarks/bench_metrics.py --no-baseline --repeats 3
    python benchmarks/bench_metrics.py --device cuda         # features on the GPU

The baseline, run in the same process, is the textbook formulation in numpy float64: one within-class
covariance Sigma_W^c [D, D] per class in a Python loop, Tr(Sigma_W^c Sigma_B^+) from it, and the NC2 Gram
matrices in full. Memory is the growth of the process's peak resident set during the call (CPU, Linux VmHWM) or of the CUDA allocator's
peak, above what the inputs already took.
"""

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one, so the
    peak measured next is that of the code timed, not of building the inputs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak since process start is reported (an upper bound)


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def make_problem(num_classes, dim, num_samples, imbalanced, seed):
    """Features with class structure (float32, like a model's output), labels, a classifier."""
    g = torch.Generator().manual_seed(seed)
    if imbalanced:  # Zipf-like test set, every class present
        weights = 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float64)
        labels = torch.multinomial(weights, num_samples - num_classes, replacement=True, generator=g)
        labels = torch.cat([torch.arange(num_classes), labels])
    else:  # balanced, like ImageNet val (50 per class)
        labels = torch.arange(num_samples) % num_classes
    centres = torch.randn(num_classes, dim, generator=g) * 2
    features = torch.randn(num_samples, dim, generator=g)
    features += centres[labels]
    classifier = centres + 0.5 * torch.randn(num_classes, dim, generator=g)
    return features, labels, classifier


def numpy_baseline(features, labels, num_classes, classifier):
    """Sigma_W^c per class in a loop (float64), pinv, NC1 per class and global, NC2 in full."""
    h = features.astype(np.float64)
    n = h.shape[0]
    global_mean = h.mean(axis=0)
    means = np.stack([h[labels == c].mean(axis=0) for c in range(num_classes)])
    centred = means - global_mean
    pinv = np.linalg.pinv(centred.T @ centred / num_classes, rcond=metrics.PINV_RTOL, hermitian=True)
    nc1_per_class, within_total = np.empty(num_classes), 0.0
    for c in range(num_classes):
        x = h[labels == c] - means[c]
        scatter = x.T @ x
        nc1_per_class[c] = np.sum(scatter * pinv) / len(x)   # Tr(S P) for symmetric S, P
        within_total += np.sum(scatter * pinv)
    off = ~np.eye(num_classes, dtype=bool)

    def etf_gap(v):
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        cos = unit @ unit.T
        gap = np.abs(cos + 1 / (num_classes - 1))
        return gap[off].mean(), gap[np.arange(num_classes), np.where(off, cos, -np.inf).argmax(1)].mean()

    nc2_m, nc2_m_nn = etf_gap(centred)
    nc2_w, nc2_w_nn = etf_gap(classifier.astype(np.float64))
    return dict(nc1=within_total / n / num_classes, nc2_m=nc2_m, nc2_m_nn=nc2_m_nn, nc2_w=nc2_w, nc2_w_nn=nc2_w_nn)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=50000)
    parser.add_argument("--imbalanced", action="store_true", help="Zipf-like labels instead of balanced")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true", help="skip the numpy per-class-loop baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, device {args.device}")
    print(f"C = {args.classes} classes, D = {args.dim} dims, N = {args.samples} samples "
          f"({'imbalanced' if args.imbalanced else 'balanced'}), features float32")
    features, labels, classifier = make_problem(args.classes, args.dim, args.samples, args.imbalanced, args.seed)
    device = torch.device(args.device)
    features, labels, classifier = features.to(device), labels.to(device), classifier.to(device)

    times = []
    reset_peak_rss()
    rss_before = current_rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = metrics.nc_metrics(features, labels, args.classes, classifier)
        times.append(time.perf_counter() - start)
    print(f"metrics.nc_metrics: {min(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")
    if device.type == "cuda":
        print(f"  CUDA peak above inputs: {(torch.cuda.max_memory_allocated() - cuda_before) / 2**20:.0f} MiB")
    else:
        print(f"  peak RSS {peak_rss_mib():.0f} MiB: +{peak_rss_mib() - rss_before:.0f} MiB above the process before the call "
              f"(features alone: {features.numel() * 4 / 2**20:.0f} MiB)")
    print("  " + "  ".join(f"{k} {result[k]:.5g}" for k in ("nc1", "nc2_m", "nc2_m_nn", "nc2_w", "nc2_w_nn")))

    if not args.no_baseline:
        f_np, y_np, w_np = features.cpu().numpy(), labels.cpu().numpy(), classifier.cpu().numpy()
        reset_peak_rss()
        rss_before = current_rss_mib()
        start = time.perf_counter()
        ref = numpy_baseline(f_np, y_np, args.classes, w_np)
        baseline_time = time.perf_counter() - start
        print(f"numpy per-class-loop baseline: {baseline_time:.2f} s, peak RSS +{peak_rss_mib() - rss_before:.0f} MiB; "
              f"metrics.nc_metrics is {baseline_time / min(times):.2f}x faster")
        print("  agreement (relative): " + "  ".join(
            f"{k} {abs(result[k] - ref[k]) / abs(ref[k]):.1e}" for k in ref))


if __name__ == "__main__":
    main()
