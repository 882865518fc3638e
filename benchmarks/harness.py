"""Timing and memory accounting shared by bench_proto_ce.py and bench_dino_op.py.

Each benchmark hands over, per method, a zero-argument `step` (one forward + backward on its inputs) and
one `clear` (drops the gradients the steps leave behind), so that every method is timed and traced alike.
Time: median wall-clock seconds per step, the methods taking turns (round robin) so that a change in
machine load affects them alike; CUDA events around each step on a GPU; on a CPU also the median CPU time
of the process (all its threads; steadier on a shared machine, though threads spinning while they wait
count too).
Memory, from the allocation trace of one step recorded by torch.profiler (profile_memory=True: every
allocation and free of torch's CPU allocator or CUDA caching allocator; on CUDA the total is cross-checked
with torch.cuda.max_memory_allocated):
  peak extra   the highest total allocated during the step, minus what was allocated before it;
  temporaries  the same, counting only allocations freed again before the step ends. This leaves out the
               gradients the step returns, which are identical for every method (and at K = 65536 prototypes
               larger than everything else); the ops' memory target refers to it.
Buffers that a BLAS library allocates internally are invisible to this accounting, for every method.
"""
import os
import platform
import statistics
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler quiet

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2.0 ** 20


def time_steps(steps, clear, device, warmup, repeats, min_seconds=0.0):
    """({method: median wall seconds}, {method: median process CPU seconds, nan on CUDA}, rounds) of one
    step. Runs at least `repeats` rounds (every method once per round) and keeps going until the rounds
    have taken `min_seconds`: a millisecond step gets hundreds of samples, whose median is stable on a
    noisy machine, while a step of seconds still runs `repeats` times only."""
    for step in steps.values():
        for _ in range(warmup):
            clear()
            step()
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    rounds, started = 0, time.perf_counter()
    while rounds < repeats or time.perf_counter() - started < min_seconds:
        rounds += 1
        for name, step in steps.items():
            clear()
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                wall[name].append(start.elapsed_time(end) / 1e3)
            else:
                start, start_cpu = time.perf_counter(), time.process_time()
                step()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    clear()
    median_cpu = {name: statistics.median(t) if t else float("nan") for name, t in cpu.items()}
    return {name: statistics.median(t) for name, t in wall.items()}, median_cpu, rounds


def allocation_events(step, device):
    """(time, address, +-bytes) of every allocation / free on `device` during one step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
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


def peak_extra_bytes(step, clear, device):
    """(peak extra bytes of one step, peak of its temporaries); see the module docstring. nan where this
    torch's profiler recorded no allocations of the device."""
    clear()
    events = allocation_events(step, device)
    clear()
    peak = peak_temporary = float("nan")
    if events:
        last_alloc = {}  # address -> index of its most recent allocation that is still alive
        for i, (_, ptr, nbytes) in enumerate(events):
            if nbytes > 0:
                last_alloc[ptr] = i
            else:
                last_alloc.pop(ptr, None)
        kept_at_end = set(last_alloc.values())
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
        step()
        torch.cuda.synchronize()
        allocator_peak = torch.cuda.max_memory_allocated() - base
        peak = allocator_peak if peak != peak else max(peak, allocator_peak)  # (nan != nan)
        clear()
    return peak, peak_temporary


def machine(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads "
            f"(torch {torch.__version__}), no GPU used")


def print_profiles(steps, clear, device, n_steps=5, rows=12):
    """For each method, torch.profiler's table of the operators and kernels its steps spend their time in
    (totals over n_steps steps; on CUDA sorted by GPU time): where a method's time goes."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            for _ in range(n_steps):
                clear()
                step()
            if device == "cuda":
                torch.cuda.synchronize()
        clear()
        print(f"\nprofile of {n_steps} {name} steps:")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70))
