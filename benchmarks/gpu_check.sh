#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one short run (a rented GPU's time is scarce):
# build the extension with its CUDA kernels, run the CUDA tests, benchmark both fused ops against eager
# PyTorch and torch.compile (bf16 runs with a profiler table of where each method spends its GPU time),
# and train each script for a few steps with --amp on the GPU.
#
#   bash benchmarks/gpu_check.sh [LOG_DIR]        # logs (and a summary) go to LOG_DIR, default gpu-logs/
#
# Needs torch with CUDA, nvcc, ninja, pytest; open_clip (and ftfy) only for the script smoke runs: on a
# machine without them and without internet, put their wheels in .whl/ (pip download --no-deps
# open_clip_torch ftfy wcwidth -d .whl) and this script installs them into /tmp/site. If the bad-input tests
# crash, a native backtrace of the first crashing case goes to LOG_DIR/gdb_backtrace.log (needs cuda-gdb).
set -u
log_dir="${1:-gpu-logs}"
mkdir -p "$log_dir"
: > "$log_dir/summary.txt"  # this run's outcomes only (the bad-input check below reads it)
if ! python3 -c "import open_clip" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PROTO_CE_BACKEND=extension MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
status=0
step() {  # step NAME COMMAND...: run, tee to LOG_DIR/NAME.log, record the outcome
    local name=$1; shift
    local start=$SECONDS
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$log_dir/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc, $((SECONDS - start)) s" | tee -a "$log_dir/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

step env bash -c 'nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; nvcc --version | tail -1'
step build python3 -c "import time, proto_ce; t = time.time(); print(proto_ce.backend('cuda'), proto_ce.backend('cpu'))"
# The bad-input tests first and on their own: GPU runs on 2026-11-26 crashed in one (a segmentation fault
# while formatting an error message; csrc/proto_ce.h message_part), and a crash must not hide the others.
cuda_tests="tests/test_proto_ce.py tests/test_dino_op.py tests/test_metrics.py"
step tests_bad_input python3 -m pytest -q -m cuda -p no:cacheprovider $cuda_tests -k bad_input
if ! grep -q "tests_bad_input: exit 0" "$log_dir/summary.txt" && command -v cuda-gdb >/dev/null; then
    timeout 120 cuda-gdb -batch -ex run -ex bt --args python3 -m pytest -q -x -m cuda -p no:cacheprovider \
        $cuda_tests -k bad_input 2>&1 | grep -v "^\[New Thread\|^\[Thread\|^\[Detaching" \
        > "$log_dir/gdb_backtrace.log"
fi
step tests python3 -m pytest -q -m cuda -p no:cacheprovider $cuda_tests -k "not bad_input"
# The scripts' AMP runs before the benchmarks: they check correctness, the benchmarks only speed.
if python3 -c "import open_clip" 2>/dev/null; then
    tiny="--num-train 2000 --num-test-per-class 10 --cache-dir /tmp/cbt-cache --epochs 1 --amp --device cuda"
    step sl_amp python3 sl_tail.py --out /tmp/gpu-runs/sl $tiny --voc 20
    step clip_amp python3 clip_tail.py --out /tmp/gpu-runs/clip $tiny
    step dino_amp python3 dino_tail.py --out /tmp/gpu-runs/dino $tiny --voc 1024
else
    echo "open_clip not importable: script smoke runs skipped" | tee -a "$log_dir/summary.txt"
fi
step bench_proto_bf16 python3 benchmarks/bench_proto_ce.py --device cuda --dtype bf16 --shapes sl,dino --profile
step bench_proto_fp32 python3 benchmarks/bench_proto_ce.py --device cuda --dtype fp32 --shapes sl,dino
step bench_dino_bf16 python3 benchmarks/bench_dino_op.py --device cuda --dtype bf16 --profile
step bench_dino_fp32 python3 benchmarks/bench_dino_op.py --device cuda --dtype fp32
cat "$log_dir/summary.txt"
exit $status
