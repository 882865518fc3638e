"""Speed and memory of the fused DINO soft-target op against eager PyTorch and torch.compile.

    python benchmarks/bench_dino_op.py                        # GPU if visible (DINO scale), else CPU (reduced)
    python benchmarks/bench_dino_op.py --device cuda --dtype bf16
    python benchmarks/bench_dino_op.py --device cpu --shapes cpu-small

Three implementations of the same loss run in this one process on the same inputs:
  dino_op   proto_ce.dino_proto_loss (the compiled op; includes its input validation)
  eager     proto_ce.reference_dino_loss_eager: DINO's loss in plain PyTorch on W[idx] (logits [rows, V]
            materialised; matmuls in the input dtype, softmax and cross-entropy in fp32), no input checks
  compile   torch.compile of that eager function (default inductor mode)
Each step is forward + backward with gradients for the student embeddings and the student prototypes (the
teacher side gets none, as in DINO). Time: median of --repeats steps after --warmup steps, the methods
taking turns step by step (CUDA: CUDA events around each step). Memory, from the allocation trace of one
step recorded by torch.profiler (profile_memory=True; on CUDA cross-checked with max_memory_allocated):
  peak extra   highest total allocated during the step minus the total before it;
  temporaries  the same counting only allocations freed again before the step ends (leaves out the
               gradients returned, identical for every method: grad_w_student [K, D] is the largest).
Shapes: "dino" = the paper's per-GPU DINO step (batch 1024 over 8 GPUs = 128 images, 2 global + 8 local
crops: 1280 student rows, 256 teacher rows; D=256 bottleneck, K=65536 prototypes, V=16384 sampled);
"dino-vanilla" the same with V=K (no subsampling); "cpu-small" (32 images, 2+4 crops, K=65536, V=4096) and
"cpu" (64 images, 2+4 crops, V=16384) for CPUs.
"""
import argparse
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
SHAPES = {"dino": dict(B=128, n_local=8, D=256, K=65536, V=16384),
          "dino-vanilla": dict(B=128, n_local=8, D=256, K=65536, V=65536),
          "cpu": dict(B=64, n_local=4, D=256, K=65536, V=16384),
          "cpu-small": dict(B=32, n_local=4, D=256, K=65536, V=4096)}
N_GLOBAL = 2
TAU_S, TAU_T = 0.1, 0.04


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shapes", default=None, help="comma-separated subset of " + ", ".join(SHAPES) +
                        " (default: dino,dino-vanilla on CUDA, cpu-small on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: 5 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_dino_op.py: error: --device cuda but no GPU is visible")
    if args.shapes is None:
        args.shapes = "dino,dino-vanilla" if args.device == "cuda" else "cpu-small"
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        sys.exit(f"bench_dino_op.py: error: unknown shape(s) {sorted(unknown)}; choose from {sorted(SHAPES)}")
    if args.repeats is None:
        args.repeats = 30 if args.device == "cuda" else 5
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def make_inputs(B, n_local, D, K, V, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    n_crops = N_GLOBAL + n_local
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=gen), dim=-1)
    student = unit(n_crops * B, D).to(device, dtype).requires_grad_()
    teacher = unit(N_GLOBAL * B, D).to(device, dtype)
    w_student = unit(K, D).to(device, dtype).requires_grad_()
    w_teacher = unit(K, D).to(device, dtype)
    idx = torch.randperm(K, generator=gen)[:V].sort().values.to(device)
    center = (0.1 * torch.randn(K, generator=gen)).to(device, dtype)
    return (student, teacher, w_student, w_teacher, idx, center, TAU_S, TAU_T, N_GLOBAL, n_crops)


def methods(compile_baseline):
    found = {"dino_op": proto_ce.dino_proto_loss, "eager": proto_ce.reference_dino_loss_eager}
    if compile_baseline:
        found["compile"] = torch.compile(proto_ce.reference_dino_loss_eager)
    return found


def step(fn, inputs):
    loss, _ = fn(*inputs)
    loss.backward()


def clear_grads(inputs):
    for t in inputs[:4]:
        t.grad = None


def time_steps(fns, inputs, device, warmup, repeats):
    """Median seconds of one fwd+bwd step per method, the methods taking turns (round robin)."""
    for fn in fns.values():
        for _ in range(warmup):
            clear_grads(inputs)
            step(fn, inputs)
    times = {name: [] for name in fns}
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
                start = time.perf_counter()
                step(fn, inputs)
                times[name].append(time.perf_counter() - start)
    clear_grads(inputs)
    return {name: statistics.median(t) for name, t in times.items()}


def allocation_events(fn, inputs, device):
    """(time, address, +-bytes) of every allocation / free on `device` during one step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, inputs)
        if device == "cuda":
            torch.cuda.synchronize()
    events, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == device:
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        nodes.extend(node.children)
    return sorted(events)


def peak_extra_bytes(fn, inputs, device):
    """(peak extra bytes of one step, peak of its temporaries); see the module docstring."""
    clear_grads(inputs)
    events = allocation_events(fn, inputs, device)
    clear_grads(inputs)
    alive = {}
    for i, (_, ptr, nbytes) in enumerate(events):
        if nbytes > 0:
            alive[ptr] = i
        else:
            alive.pop(ptr, None)
    kept_at_end = set(alive.values())
    running = kept = peak = peak_temporary = 0
    for i, (_, _, nbytes) in enumerate(events):
        running += nbytes
        kept += nbytes if i in kept_at_end else 0
        peak = max(peak, running)
        peak_temporary = max(peak_temporary, running - kept)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, inputs)
        torch.cuda.synchronize()
        peak = max(peak, torch.cuda.max_memory_allocated() - base)
        clear_grads(inputs)
    return peak, peak_temporary


def machine(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads "
            f"(torch {torch.__version__}), no GPU used")


def run_shape(name, shape, args, fns):
    inputs = make_inputs(**shape, dtype=DTYPES[args.dtype], device=args.device, seed=args.seed)
    with torch.no_grad():  # the implementations agree before anything is timed
        losses = {m: float(fn(*inputs)[0]) for m, fn in fns.items()}
    if max(abs(v - losses["eager"]) for v in losses.values()) > 1e-2 * max(1.0, abs(losses["eager"])):
        sys.exit(f"bench_dino_op.py: error: the implementations disagree on {name}: {losses}")
    seconds = time_steps(fns, inputs, args.device, args.warmup, args.repeats)
    rows = {m: (seconds[m], *peak_extra_bytes(fn, inputs, args.device)) for m, fn in fns.items()}
    n_crops = N_GLOBAL + shape["n_local"]
    print(f"\n[{name}] {shape['B']} images x (2 global + {shape['n_local']} local crops): student rows "
          f"{n_crops * shape['B']}, teacher rows {N_GLOBAL * shape['B']}, D={shape['D']} K={shape['K']} "
          f"V={shape['V']}  dtype={args.dtype} device={args.device}  (median of {args.repeats} fwd+bwd steps "
          f"after {args.warmup} warm-up)")
    print(f"{'method':<9} {'fwd+bwd ms':>11} {'speed-up vs eager':>18} {'vs compile':>11} {'peak extra MiB':>15} "
          f"{'temporaries MiB':>16} {'temporaries / eager':>20}")
    mib = 2.0 ** 20
    eager_s, _, eager_temp = rows["eager"]
    compile_s = rows["compile"][0] if "compile" in rows else None
    for method, (sec, peak, temp) in rows.items():
        vs_compile = f"{compile_s / sec:>10.2f}x" if compile_s else f"{'-':>11}"
        print(f"{method:<9} {sec * 1e3:>11.2f} {eager_s / sec:>17.2f}x {vs_compile} {peak / mib:>15.1f} "
              f"{temp / mib:>16.1f} {temp / max(eager_temp, 1):>20.3f}")


def main():
    args = parse_args()
    print(f"bench_dino_op.py on {machine(args.device)}; proto_ce backend: {proto_ce.backend(args.device)}; "
          f"{time.strftime('%Y-%m-%d')}")
    fns = methods(not args.no_compile)
    for name in args.shapes.split(","):
        run_shape(name, SHAPES[name], args, fns)


if __name__ == "__main__":
    main()
