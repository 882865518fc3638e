#!/usr/bin/env bash
# How the fused ops' GPU wall time depends on their chunk sizes at the DINO shape (bf16, no torch.compile
# baseline, so it takes about 2.5 minutes on an H100 including the build). On the H100 the ops are bound by
# the host: each row block / column chunk costs a handful of ATen calls, so fewer, larger chunks run faster
# and take more memory. The sizes are forced with the kernels' chunk overrides (csrc/proto_ce.h), the same
# code path as a larger kCudaChunkBytes:
#   hard-label op (bench_proto_ce.py --shapes dino, B=2560 V=16384): PROTO_CE_CHUNK_ROWS, rows per block
#   (default at 32 MiB: 341 in bf16, 8 blocks)
#   soft DINO op (bench_dino_op.py --shapes dino, 1536 rows, V=16384): PROTO_CE_CHUNK_COLS, prototypes per
#   chunk (default at 16 MiB: 2688, 7 chunks)
#
#   bash benchmarks/gpu_chunk_probe.sh [ROWS...] [-- COLS...]    # default: 1280 2560 -- 8192 16384
set -u
export PYTHONUNBUFFERED=1 PROTO_CE_BACKEND=extension MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
rows=() cols=() target=rows
for a in "$@"; do
    if [ "$a" = "--" ]; then target=cols; elif [ $target = rows ]; then rows+=("$a"); else cols+=("$a"); fi
done
[ ${#rows[@]} -gt 0 ] || rows=(1280 2560)
[ ${#cols[@]} -gt 0 ] || cols=(8192 16384)
python3 -c "import proto_ce; print('backend:', proto_ce.backend('cuda'))" || exit 1
common="--device cuda --dtype bf16 --no-compile --min-seconds 1.5 --warmup 3"
for n in default "${rows[@]}"; do
    echo "### hard-label op, PROTO_CE_CHUNK_ROWS=$n"
    if [ "$n" = default ]; then unset PROTO_CE_CHUNK_ROWS; else export PROTO_CE_CHUNK_ROWS=$n; fi
    python3 benchmarks/bench_proto_ce.py $common --shapes dino 2>&1 | grep -E "^(method|proto_ce|eager) "
done
unset PROTO_CE_CHUNK_ROWS
for n in default "${cols[@]}"; do
    echo "### soft DINO op, PROTO_CE_CHUNK_COLS=$n"
    if [ "$n" = default ]; then unset PROTO_CE_CHUNK_COLS; else export PROTO_CE_CHUNK_COLS=$n; fi
    python3 benchmarks/bench_dino_op.py $common --shapes dino 2>&1 | grep -E "^(method|dino_op|eager) "
done
