"""Speed and memory of the fused subsampled-prototype cross-entropy against eager PyTorch and torch.compile.

    python benchmarks/bench_proto_ce.py                      # CPU (or GPU if visible), fp32, both shapes
    python benchmarks/bench_proto_ce.py --device cuda --dtype bf16

Three implementations of the same loss run in this one process on the same inputs:
  proto_ce  proto_ce.proto_cross_entropy (the compiled op; includes its input validation and label remap)
  eager     F.cross_entropy(scale * x @ w[idx].T, target) in plain PyTorch, target positions precomputed
            (proto_ce.reference_loss_from_positions: the matmul in the input dtype, the loss in fp32)
  compile   torch.compile of that eager function (default inductor mode)
Time: forward + backward (gradients for x, w and the scale) per step, median of --repeats after --warmup
steps (CUDA: CUDA events around the step). Memory: peak extra memory of one step over what was allocated
before it; CUDA: torch.cuda.max_memory_allocated; CPU: the peak of the running sum of every allocation
and free of torch's CPU allocator recorded by torch.profiler (profile_memory=True), i.e. the same
allocator-level quantity (buffers that the BLAS allocates internally are not seen, for any method). The
"excl. grads" column subtracts the returned gradients (x.grad, w.grad [K, D], scale.grad), which every
method must produce; the op's memory target refers to the working memory in that column.
Shapes (issue 3): "sl" B=256 D=1024 K=1000 V=100; "dino" B=2560 D=256 K=65536 V=16384, reduced on a CPU to
B=512 V=4096 (pass --full-dino to run the full size there too).
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler quiet
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import proto_ce  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"sl": dict(B=256, D=1024, K=1000, V=100), "dino": dict(B=2560, D=256, K=65536, V=16384)}
CPU_DINO = dict(B=512, D=256, K=65536, V=4096)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shapes", default="sl,dino", help="comma-separated subset of: sl, dino")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: 20 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--full-dino", action="store_true", help="full DINO shape on a CPU too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_proto_ce.py: error: --device cuda but no GPU is visible")
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        sys.exit(f"bench_proto_ce.py: error: unknown shape(s) {sorted(unknown)}; choose from {sorted(SHAPES)}")
    if args.repeats is None:
        args.repeats = 50 if args.device == "cuda" else 20
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


def time_step(fn, inputs, device, warmup, repeats):
    for _ in range(warmup):
        clear_grads(inputs)
        step(fn, inputs)
    times = []
    for _ in range(repeats):
        clear_grads(inputs)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            step(fn, inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            step(fn, inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_peak_bytes(fn, inputs):
    """Peak of the running sum of CPU allocator events during one step (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, inputs)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_extra_bytes(fn, inputs, device):
    """(peak extra bytes of one step, the same minus the returned gradients)."""
    clear_grads(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_bytes(fn, inputs)
    grads = sum(t.grad.numel() * t.grad.element_size() for t in inputs if t.grad is not None)
    clear_grads(inputs)
    return peak, peak - grads


def machine(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads "
            f"(torch {torch.__version__}), no GPU used")


def run_shape(name, shape, args, fns):
    dtype = DTYPES[args.dtype]
    x, w, idx, labels, target, scale = make_inputs(**shape, dtype=dtype, device=args.device, seed=args.seed)
    leaves = (x, w, scale)
    inputs = (x, w, idx, labels, target, scale)
    with torch.no_grad():  # the implementations agree before anything is timed
        losses = {m: float(fn(*inputs)) for m, fn in fns.items()}
    if max(abs(v - losses["eager"]) for v in losses.values()) > 1e-2 * max(1.0, abs(losses["eager"])):
        sys.exit(f"bench_proto_ce.py: error: the implementations disagree on {name}: {losses}")
    rows = {}
    for method, fn in fns.items():
        seconds = time_step(lambda *a: fn(*a), inputs, args.device, args.warmup, args.repeats)
        for t in leaves:
            t.grad = None
        peak, working = peak_extra_bytes(fn, inputs, args.device)
        rows[method] = (seconds, peak, working)
    mib = 2.0 ** 20
    desc = " ".join(f"{k}={v}" for k, v in shape.items())
    print(f"\n[{name}] {desc}  dtype={args.dtype}  device={args.device}  "
          f"(median of {args.repeats} fwd+bwd steps after {args.warmup} warm-up)")
    print(f"{'method':<10} {'fwd+bwd ms':>11} {'speed-up vs eager':>18} {'peak extra MiB':>15} "
          f"{'excl. grads MiB':>16} {'mem / eager (excl. grads)':>26}")
    eager_s, _, eager_working = rows["eager"]
    for method, (seconds, peak, working) in rows.items():
        print(f"{method:<10} {seconds * 1e3:>11.3f} {eager_s / seconds:>17.2f}x {peak / mib:>15.2f} "
              f"{working / mib:>16.2f} {working / max(eager_working, 1):>26.3f}")
    if "compile" in rows:
        print(f"proto_ce vs compile: {rows['compile'][0] / rows['proto_ce'][0]:.2f}x speed, "
              f"{rows['proto_ce'][2] / max(rows['compile'][2], 1):.3f}x working memory")
    return rows


def main():
    args = parse_args()
    print(f"bench_proto_ce.py  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine(args.device)}")
    print(f"proto_ce backend for {args.device}: {proto_ce.backend(args.device)}")
    if proto_ce.backend(args.device) == "reference":
        print("warning: the compiled op is not available; 'proto_ce' below is the pure-PyTorch reference")
    fns = methods(not args.no_compile)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        if name == "dino" and args.device == "cpu" and not args.full_dino:
            shape = CPU_DINO
            print("\nnote: DINO shape reduced for the CPU (B=512, V=4096 instead of B=2560, V=16384)")
        run_shape(name, shape, args, fns)


if __name__ == "__main__":
    main()
