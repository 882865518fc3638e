"""Speed and memory of the fused subsampled-prototype cross-entropy against eager PyTorch and torch.compile.

    python benchmarks/bench_proto_ce.py                      # CPU (or GPU if visible), fp32, both shapes
    python benchmarks/bench_proto_ce.py --device cuda --dtype bf16

Three implementations of the same loss run in this one process on the same inputs:
  proto_ce  proto_ce.proto_cross_entropy (the compiled op; includes its input validation and label remap)
  eager     F.cross_entropy(scale * x @ w[idx].T, target) in plain PyTorch, target positions precomputed
            (proto_ce.reference_loss_from_positions: the matmul in the input dtype, the loss in fp32)
  compile   torch.compile of that eager function (default inductor mode)
Time: forward + backward (gradients for x, w and the scale) per step, median of --repeats steps after
--warmup steps; the methods take turns step by step (CUDA: CUDA events around each step).
Memory, from the allocation trace of one step recorded by torch.profiler (profile_memory=True: every
allocation and free of torch's CPU allocator or CUDA caching allocator; on CUDA the total is cross-checked
with torch.cuda.max_memory_allocated):
  peak extra   the highest total allocated during the step, minus what was allocated before it;
  temporaries  the same, counting only allocations freed again before the step ends. This leaves out the
               gradients the step returns (x.grad, w.grad [K, D], scale.grad), identical for every method
               and, at K = 65536, larger than everything else; the op's memory target refers to it.
Buffers that a BLAS library allocates internally are invisible to this accounting, for every method.
Shapes (issue 3): "sl" B=256 D=1024 K=1000 V=100; "dino" B=2560 D=256 K=65536 V=16384 (full size on a CPU
too: one step takes seconds there, and eager needs about 1 GB); "dino-small" B=512 V=4096, a quick check.
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
SHAPES = {"sl": dict(B=256, D=1024, K=1000, V=100), "dino": dict(B=2560, D=256, K=65536, V=16384),
          "dino-small": dict(B=512, D=256, K=65536, V=4096)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shapes", default="sl,dino", help="comma-separated subset of: sl, dino, dino-small")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: 10 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
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


def time_steps(fns, inputs, device, warmup, repeats):
    """Median wall-clock seconds of one fwd+bwd step per method, and on a CPU also the median CPU time of
    the process during the step (all its threads; less sensitive to other jobs on a shared machine,
    though threads that spin while waiting count too). The methods take turns (round robin) so that a
    change in machine load during the run affects them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            clear_grads(inputs)
            step(fn, inputs)
    times = {name: [] for name in fns}
    cpu_times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            clear_grads(inputs)
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                step(fn, inputs)
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                start, start_cpu = time.perf_counter(), time.process_time()
                step(fn, inputs)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - start_cpu)
    clear_grads(inputs)
    median_cpu = {name: statistics.median(t) if t else float("nan") for name, t in cpu_times.items()}
    return {name: statistics.median(t) for name, t in times.items()}, median_cpu


def allocation_events(fn, inputs, device):
    """(time, address, +-bytes) of every allocation / free on `device` during one step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
    events = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == device:
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        nodes.extend(node.children)
    return sorted(events)


def peak_extra_bytes(fn, inputs, device):
    """(peak extra bytes of one step, peak of its temporaries).

    Peak extra: the highest total allocated during the step minus the total before it. Temporaries:
    the same counting only allocations that are freed again before the step ends, i.e. leaving out the
    gradients the step returns (x.grad, w.grad [K, D], scale.grad), which every method must allocate."""
    clear_grads(inputs)
    events = allocation_events(fn, inputs, device)
    clear_grads(inputs)
    if not events:  # this torch's profiler recorded no allocations of this device: no trace to read
        peak, peak_temporary = float("nan"), float("nan")
    last_alloc = {}  # address -> index of its most recent allocation that is still alive
    for i, (_, ptr, nbytes) in enumerate(events):
        if nbytes > 0:
            last_alloc[ptr] = i
        else:
            last_alloc.pop(ptr, None)
    kept_at_end = set(last_alloc.values())
    if events:
        running = kept = peak = peak_temporary = 0
        for i, (_, _, nbytes) in enumerate(events):
            running += nbytes
            kept += nbytes if i in kept_at_end else 0
            peak = max(peak, running)
            peak_temporary = max(peak_temporary, running - kept)
    if device == "cuda":  # cross-check of the total with the caching allocator's own statistics
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, inputs)
        torch.cuda.synchronize()
        allocator_peak = torch.cuda.max_memory_allocated() - base
        peak = allocator_peak if peak != peak else max(peak, allocator_peak)  # (nan != nan)
        clear_grads(inputs)
    return peak, peak_temporary


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
    seconds, cpu_seconds = time_steps(fns, inputs, args.device, args.warmup, args.repeats)
    rows = {method: (seconds[method], *peak_extra_bytes(fn, inputs, args.device)) for method, fn in fns.items()}
    mib = 2.0 ** 20
    desc = " ".join(f"{k}={v}" for k, v in shape.items())
    print(f"\n[{name}] {desc}  dtype={args.dtype}  device={args.device}  "
          f"(median of {args.repeats} fwd+bwd steps after {args.warmup} warm-up)")
    cpu = args.device == "cpu"
    print(f"{'method':<10} {'fwd+bwd ms':>11} {'speed-up vs eager':>18} "
          + (f"{'cpu-time ms':>12} {'(vs eager)':>10} " if cpu else "")
          + f"{'peak extra MiB':>15} {'temporaries MiB':>16} {'temporaries / eager':>20}")
    eager_s, _, eager_temp = rows["eager"]
    for method, (sec, peak, temp) in rows.items():
        cpu_cols = f"{cpu_seconds[method] * 1e3:>12.3f} {cpu_seconds['eager'] / cpu_seconds[method]:>9.2f}x " if cpu else ""
        print(f"{method:<10} {sec * 1e3:>11.3f} {eager_s / sec:>17.2f}x " + cpu_cols
              + f"{peak / mib:>15.2f} {temp / mib:>16.2f} {temp / max(eager_temp, 1):>20.3f}")
    if "compile" in rows:
        print(f"proto_ce vs compile: {rows['compile'][0] / rows['proto_ce'][0]:.2f}x speed-up, "
              f"{rows['proto_ce'][2] / max(rows['compile'][2], 1):.3f}x the temporaries")
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
