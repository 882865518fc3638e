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
teacher side gets none, as in DINO). Time (median step, methods in turn) and memory (peak extra, and
temporaries: what the step frees again before it ends, i.e. without the gradients it returns, the largest
being grad_w_student [K, D]) are measured as benchmarks/harness.py describes.
Shapes: "dino" = the paper's per-GPU DINO step (batch 1024 over 8 GPUs = 128 images, 2 global + 8 local
crops: 1280 student rows, 256 teacher rows; D=256 bottleneck, K=65536 prototypes, V=16384 sampled);
"dino-vanilla" the same with V=K (no subsampling); "cpu-small" (32 images, 2+4 crops, K=65536, V=4096) and
"cpu" (64 images, 2+4 crops, V=16384) for CPUs.
"""
import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import proto_ce  # noqa: E402
from harness import DTYPES, MIB, machine, peak_extra_bytes, print_profiles, time_steps  # noqa: E402

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
    parser.add_argument("--repeats", type=int, default=None, help="timed steps at least (default: 5 on CPU, 30 on CUDA)")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="keep timing until the timed steps of all methods took this long (default: 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's table of where one step of each method spends its time")
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


def run_shape(name, shape, args, fns):
    inputs = make_inputs(**shape, dtype=DTYPES[args.dtype], device=args.device, seed=args.seed)
    with torch.no_grad():  # the implementations agree before anything is timed
        losses = {m: float(fn(*inputs)[0]) for m, fn in fns.items()}
    if max(abs(v - losses["eager"]) for v in losses.values()) > 1e-2 * max(1.0, abs(losses["eager"])):
        sys.exit(f"bench_dino_op.py: error: the implementations disagree on {name}: {losses}")
    steps = {method: (lambda fn=fn: step(fn, inputs)) for method, fn in fns.items()}
    clear = functools.partial(clear_grads, inputs)
    seconds, _, rounds = time_steps(steps, clear, args.device, args.warmup, args.repeats, args.min_seconds)
    rows = {method: (seconds[method], *peak_extra_bytes(steps[method], clear, args.device)) for method in fns}
    n_crops = N_GLOBAL + shape["n_local"]
    print(f"\n[{name}] {shape['B']} images x (2 global + {shape['n_local']} local crops): student rows "
          f"{n_crops * shape['B']}, teacher rows {N_GLOBAL * shape['B']}, D={shape['D']} K={shape['K']} "
          f"V={shape['V']}  dtype={args.dtype} device={args.device}  (median of {rounds} fwd+bwd steps "
          f"after {args.warmup} warm-up)")
    print(f"{'method':<9} {'fwd+bwd ms':>11} {'speed-up vs eager':>18} {'vs compile':>11} {'peak extra MiB':>15} "
          f"{'temporaries MiB':>16} {'temporaries / eager':>20}")
    eager_s, _, eager_temp = rows["eager"]
    compile_s = rows["compile"][0] if "compile" in rows else None
    for method, (sec, peak, temp) in rows.items():
        vs_compile = f"{compile_s / sec:>10.2f}x" if compile_s else f"{'-':>11}"
        print(f"{method:<9} {sec * 1e3:>11.2f} {eager_s / sec:>17.2f}x {vs_compile} {peak / MIB:>15.1f} "
              f"{temp / MIB:>16.1f} {temp / max(eager_temp, 1):>20.3f}")
    if args.profile:
        print_profiles(steps, clear, args.device)


def main():
    args = parse_args()
    print(f"bench_dino_op.py on {machine(args.device)}; proto_ce backend: {proto_ce.backend(args.device)}; "
          f"{time.strftime('%Y-%m-%d')}")
    fns = methods(not args.no_compile)
    for name in args.shapes.split(","):
        run_shape(name, SHAPES[name], args, fns)


if __name__ == "__main__":
    main()
