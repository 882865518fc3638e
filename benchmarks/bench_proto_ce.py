"""Speed and memory of the fused subsampled-prototype cross-entropy against eager PyTorch and torch.compile.

    python benchmarks/bench_proto_ce.py                      # CPU (or GPU if visible), fp32, both shapes
    python benchmarks/bench_proto_ce.py --device cuda --dtype bf16

Three implementations of the same loss run in this one process on the same inputs:
  proto_ce  proto_ce.proto_cross_entropy (the compiled op; includes its input validation and label remap)
  eager     F.cross_entropy(scale * x @ w[idx].T, target) in plain PyTorch, target positions precomputed
            (proto_ce.reference_loss_from_positions: the matmul in the input dtype, the loss in fp32)
  compile   torch.compile of that eager function (default inductor mode)
Time (median step, methods in turn) and memory (peak extra, and temporaries: what the step frees again
before it ends, i.e. without the gradients it returns) are measured as benchmarks/harness.py describes.
Shapes (issue 3): "sl" B=256 D=1024 K=1000 V=100; "dino" B=2560 D=256 K=65536 V=16384 (full size on a CPU
too: one step takes seconds there, and eager needs about 1 GB); "dino-small" B=512 V=4096, a quick check.
"""
import argparse
import datetime
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import proto_ce  # noqa: E402
from harness import DTYPES, MIB, machine, peak_extra_bytes, print_profiles, time_steps  # noqa: E402

SHAPES = {"sl": dict(B=256, D=1024, K=1000, V=100), "dino": dict(B=2560, D=256, K=65536, V=16384),
          "dino-small": dict(B=512, D=256, K=65536, V=4096)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shapes", default="sl,dino", help="comma-separated subset of: sl, dino, dino-small")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps at least (default: 10 on CPU, 50 on CUDA)")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="keep timing until the timed steps of all methods took this long (default: 3)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's table of where one step of each method spends its time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_proto_ce.py: error: --device cuda but no GPU is visible")
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        sys.exit(f"bench_proto_ce.py: error: unknown shape(s) {sorted(unknown)}; choose from {sorted(SHAPES)}")
    if args.repeats is None:
        args.repeats = 50 if args.device == "cuda" else 10
    return args


def make_inputs(B, D, K, V, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=gen), dim=1).to(device, dtype).requires_grad_()
    w = F.normalize(torch.randn(K, D, generator=gen), dim=1).to(device, dtype).requires_grad_()
    idx = torch.randperm(K, generator=gen)[:V].sort().values.to(device)
    labels = idx[torch.randint(V, (B,), generator=gen).to(device)]
    target = torch.searchsorted(idx, labels)
    scale = torch.tensor(1 / 0.07, device=device).requires_grad_()
    return x, w, idx, labels, target, scale


def methods(compile_baseline):
    found = {
        "proto_ce": lambda x, w, idx, labels, target, s: proto_ce.proto_cross_entropy(x, w, idx, labels, s),
        "eager": lambda x, w, idx, labels, target, s: proto_ce.reference_loss_from_positions(x, w, idx, target, s),
    }
    if compile_baseline:
        compiled = torch.compile(proto_ce.reference_loss_from_positions)
        found["compile"] = lambda x, w, idx, labels, target, s: compiled(x, w, idx, target, s)
    return found


def step(fn, inputs):
    fn(*inputs).backward()


def clear_grads(inputs):
    for t in inputs:
        t.grad = None


def run_shape(name, shape, args, fns):
    dtype = DTYPES[args.dtype]
    x, w, idx, labels, target, scale = make_inputs(**shape, dtype=dtype, device=args.device, seed=args.seed)
    leaves = (x, w, scale)
    inputs = (x, w, idx, labels, target, scale)
    with torch.no_grad():  # the implementations agree before anything is timed
        losses = {m: float(fn(*inputs)) for m, fn in fns.items()}
    if max(abs(v - losses["eager"]) for v in losses.values()) > 1e-2 * max(1.0, abs(losses["eager"])):
        sys.exit(f"bench_proto_ce.py: error: the implementations disagree on {name}: {losses}")
    steps = {method: (lambda fn=fn: step(fn, inputs)) for method, fn in fns.items()}
    clear = functools.partial(clear_grads, leaves)
    seconds, cpu_seconds, rounds = time_steps(steps, clear, args.device, args.warmup, args.repeats,
                                             args.min_seconds)
    rows = {method: (seconds[method], *peak_extra_bytes(steps[method], clear, args.device)) for method in fns}
    desc = " ".join(f"{k}={v}" for k, v in shape.items())
    print(f"\n[{name}] {desc}  dtype={args.dtype}  device={args.device}  "
          f"(median of {rounds} fwd+bwd steps after {args.warmup} warm-up)")
    cpu = args.device == "cpu"
    print(f"{'method':<10} {'fwd+bwd ms':>11} {'speed-up vs eager':>18} "
          + (f"{'cpu-time ms':>12} {'(vs eager)':>10} " if cpu else "")
          + f"{'peak extra MiB':>15} {'temporaries MiB':>16} {'temporaries / eager':>20}")
    eager_s, _, eager_temp = rows["eager"]
    for method, (sec, peak, temp) in rows.items():
        cpu_cols = f"{cpu_seconds[method] * 1e3:>12.3f} {cpu_seconds['eager'] / cpu_seconds[method]:>9.2f}x " if cpu else ""
        print(f"{method:<10} {sec * 1e3:>11.3f} {eager_s / sec:>17.2f}x " + cpu_cols
              + f"{peak / MIB:>15.2f} {temp / MIB:>16.2f} {temp / max(eager_temp, 1):>20.3f}")
    if "compile" in rows:
        print(f"proto_ce vs compile: {rows['compile'][0] / rows['proto_ce'][0]:.2f}x speed-up, "
              f"{rows['proto_ce'][2] / max(rows['compile'][2], 1):.3f}x the temporaries")
    if args.profile:
        print_profiles(steps, clear, args.device)
    return rows


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"bench_proto_ce.py  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine(args.device)}")
    if args.device == "cpu" and hasattr(os, "getloadavg"):
        print(f"load average at start (other jobs on this machine): {os.getloadavg()[0]:.2f}")
    print(f"proto_ce backend for {args.device}: {proto_ce.backend(args.device)}")
    if proto_ce.backend(args.device) == "reference":
        print("warning: the compiled op is not available; 'proto_ce' below is the pure-PyTorch reference")
    fns = methods(not args.no_compile)
    for name in args.shapes.split(","):
        run_shape(name, SHAPES[name], args, fns)


if __name__ == "__main__":
    main()
