// CUDA kernels of the hard-label subsampled-prototype cross-entropy (see ops.cpp for the schemas).
//
// Same plan as the CPU kernels, with ATen's cuBLAS matmuls and fused row kernels for the softmax:
//   forward, per chunk of Vc prototype columns:
//     gather w[idx[chunk]] -> Wc [Vc, D]                                   (index_select)
//     Z = X Wc^T  [B, Vc] with fp32 output and fp32 accumulation           (at::mm; tensor cores for
//                                                                           fp16/bf16, TF32 for fp32 only
//                                                                           if torch allows it)
//     one block per row: online log-sum-exp update (max, rescaled sum) and the target logit
//   backward, per chunk: Z again, then one block per row turns it into dZ = g * scale * (softmax - onehot)
//     (in the input dtype, for the tensor-core GEMMs) and adds its row's share of d scale = sum dlogits * Z;
//     dX += dZ Wc (fp32 accumulator across chunks), dWc = dZ^T X, scattered into the idx rows of dW.
// target_pos is asserted to lie in [0, V) on the device (CUDA_KERNEL_ASSERT, as ATen's index kernels do):
// proto_ce.py computes it with label_positions, so only a direct torch.ops call with bad positions trips
// the assert, which ends the CUDA context instead of reading out of bounds or silently dropping the
// target (a host-side check would synchronise every call).
// Only [B, Vc] and [Vc, D] buffers exist (Vc sized to a memory budget), never [B, V]. There are no
// floating-point atomics: every reduction has a fixed order, so results are bit-identical run to run.
// The matmuls go through ATen (not raw cuBLAS) so that this file needs no cuBLAS/cuSPARSE headers: some
// CUDA toolkits (e.g. CI images with only nvcc) do not ship them. fp32 output from fp16/bf16 inputs uses
// the aten::mm.dtype overload of torch >= 2.8; older torch rounds the chunk logits to the input dtype
// first (as eager autocast code does).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "proto_ce.h"

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define PROTO_CE_HAVE_MM_OUT_DTYPE 1
#else
#define PROTO_CE_HAVE_MM_OUT_DTYPE 0
#endif

namespace proto_ce {
namespace {

// Budget of one chunk's buffers (logits in fp32 plus dlogits and gathered prototypes in the input dtype):
// small enough to stay mostly in an H100's 50 MB L2 and far below eager's [B, V] tensors.
constexpr int64_t kCudaChunkBytes = 32LL << 20;
constexpr int kThreads = 256;  // threads per row block; a multiple of 32

// a [r, k] times b [c, k]^T -> [r, c] in the accumulation dtype (fp32 for fp16/bf16 inputs).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b_t, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b_t);
#if PROTO_CE_HAVE_MM_OUT_DTYPE
  return at::mm(a, b_t, acc);
#else
  return at::mm(a, b_t).to(acc);
#endif
}

template <typename acc_t>
struct MaxOp {
  __device__ acc_t operator()(acc_t a, acc_t b) const { return a > b ? a : b; }
};
template <typename acc_t>
struct SumOp {
  __device__ acc_t operator()(acc_t a, acc_t b) const { return a + b; }
};

// Reduces one value per thread over the block in a fixed order (warp shuffles, then the warp leaders);
// every thread gets the result. `shared` holds 32 values.
template <typename acc_t, typename Op>
__device__ acc_t block_reduce(acc_t value, Op op, acc_t identity, acc_t* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < warps ? shared[lane] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
    if (lane == 0) shared[0] = value;
  }
  __syncthreads();
  value = shared[0];
  __syncthreads();  // shared may be reused by the next call
  return value;
}

// Forward, one block per row b of a chunk [c0, c0 + n): folds the chunk into the row's running max and
// rescaled sum of exp(scale * z), and records the target logit if the target lies in the chunk.
template <typename acc_t>
__global__ void lse_update_kernel(const acc_t* __restrict__ Z, int64_t n, int64_t c0, int64_t V,
                                  const acc_t* __restrict__ scale,
                                  const int64_t* __restrict__ target_pos, acc_t* __restrict__ row_max,
                                  acc_t* __restrict__ row_sum, acc_t* __restrict__ target_logit) {
  __shared__ acc_t shared[32];
  const int64_t b = blockIdx.x;
  const acc_t* row = Z + b * n;
  const acc_t s = *scale;
  acc_t chunk_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) chunk_max = MaxOp<acc_t>()(chunk_max, s * row[j]);
  chunk_max = block_reduce(chunk_max, MaxOp<acc_t>(), -std::numeric_limits<acc_t>::infinity(), shared);
  const acc_t old_max = row_max[b];
  const acc_t new_max = MaxOp<acc_t>()(old_max, chunk_max);
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sum += exp(s * row[j] - new_max);
  sum = block_reduce(sum, SumOp<acc_t>(), acc_t(0), shared);
  if (threadIdx.x == 0) {
    row_sum[b] = row_sum[b] * exp(old_max - new_max) + sum;  // exp(-inf) = 0 on the first chunk
    row_max[b] = new_max;
    CUDA_KERNEL_ASSERT(target_pos[b] >= 0 && target_pos[b] < V);
    const int64_t t = target_pos[b] - c0;
    if (t >= 0 && t < n) target_logit[b] = s * row[t];
  }
}

// Backward, one block per row b of a chunk: dZ[b, j] = g_b * scale * (softmax_bj - [j == target]) in the
// input dtype, and row_dscale[b] += sum_j g_b * (softmax_bj - [j == target]) * Z[b, j].
template <typename scalar_t, typename acc_t>
__global__ void dlogits_kernel(const acc_t* __restrict__ Z, int64_t n, int64_t c0, int64_t V,
                               const acc_t* __restrict__ scale,
                               const int64_t* __restrict__ target_pos, const acc_t* __restrict__ lse,
                               const acc_t* __restrict__ grad, scalar_t* __restrict__ dZ,
                               acc_t* __restrict__ row_dscale) {
  __shared__ acc_t shared[32];
  const int64_t b = blockIdx.x;
  const acc_t* row = Z + b * n;
  scalar_t* drow = dZ + b * n;
  const acc_t s = *scale, g = grad[b], l = lse[b];
  CUDA_KERNEL_ASSERT(target_pos[b] >= 0 && target_pos[b] < V);
  const int64_t t = target_pos[b] - c0;
  acc_t part = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const acc_t z = row[j];
    const acc_t d = g * (exp(s * z - l) - (j == t ? acc_t(1) : acc_t(0)));
    part += d * z;
    drow[j] = static_cast<scalar_t>(d * s);
  }
  part = block_reduce(part, SumOp<acc_t>(), acc_t(0), shared);
  if (threadIdx.x == 0) row_dscale[b] += part;
}

// Checks idx (range, duplicates, order) and finds each label's position in idx by binary search. The
// first offending index of each kind is recorded with an integer atomicMin (order-independent).
// err: [0] idx out of range, [1] duplicate, [2] unsorted, [3] label not in idx; "none" = UINT64 max.
__global__ void label_positions_kernel(const int64_t* __restrict__ idx, int64_t V, const int64_t* __restrict__ labels,
                                       int64_t B, int64_t num_classes, int64_t* __restrict__ pos,
                                       unsigned long long* __restrict__ err) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < V) {
    const int64_t v = idx[i];
    if (v < 0 || v >= num_classes) atomicMin(&err[0], static_cast<unsigned long long>(i));
    if (i > 0) {
      const int64_t prev = idx[i - 1];
      if (v == prev) atomicMin(&err[1], static_cast<unsigned long long>(i));
      if (v < prev) atomicMin(&err[2], static_cast<unsigned long long>(i));
    }
  }
  if (i < B) {
    const int64_t label = labels[i];
    int64_t lo = 0, hi = V;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (idx[mid] < label) lo = mid + 1; else hi = mid;
    }
    pos[i] = lo;
    if (lo == V || idx[lo] != label) atomicMin(&err[3], static_cast<unsigned long long>(i));
  }
}

at::Tensor label_positions_cuda(const at::Tensor& idx_in, const at::Tensor& labels_in, int64_t num_classes) {
  check_label_args(idx_in, labels_in);
  c10::cuda::CUDAGuard guard(idx_in.device());
  const at::Tensor idx = idx_in.contiguous(), labels = labels_in.contiguous();
  const int64_t V = idx.numel(), B = labels.numel();
  at::Tensor pos = at::empty_like(labels);
  constexpr uint64_t kNone = std::numeric_limits<uint64_t>::max();
  at::Tensor err = at::full({4}, -1, idx.options());  // all bits set = kNone as unsigned
  const int64_t threads = 256, blocks = (std::max(V, B) + threads - 1) / threads;
  if (blocks > 0) {
    label_positions_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        idx.data_ptr<int64_t>(), V, labels.data_ptr<int64_t>(), B, num_classes, pos.data_ptr<int64_t>(),
        reinterpret_cast<unsigned long long*>(err.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor err_host = err.cpu();  // the op's one device-to-host sync: errors must raise here
  const uint64_t* e = reinterpret_cast<const uint64_t*>(err_host.data_ptr<int64_t>());
  if (e[0] != kNone || e[1] != kNone || e[2] != kNone) {  // the host scan names the first offending entry
    check_sorted_unique_ids(idx.cpu(), num_classes, "class", "w has");
    PROTO_CE_CHECK(false, "proto_ce: idx is not sorted, unique and within [0, ", num_classes, ")");  // (unreachable)
  }
  if (e[3] != kNone) {
    const int64_t b = static_cast<int64_t>(e[3]);
    fail_label_not_in_idx(labels[b].item<int64_t>(), b);
  }
  return pos;
}

template <typename scalar_t>
void forward_chunks(const at::Tensor& X, const at::Tensor& w, const at::Tensor& idx, const at::Tensor& target_pos,
                    const at::Tensor& scale, at::Tensor& row_max, at::Tensor& row_sum, at::Tensor& target_logit) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = row_max.scalar_type();
  const int64_t B = X.size(0), D = X.size(1), V = idx.numel();
  const int64_t bytes_per_col = B * sizeof(acc_t) + D * sizeof(scalar_t);
  const int64_t Vc = chunk_cols(V, bytes_per_col, kCudaChunkBytes, 64);
  at::Tensor w_buf = at::empty({Vc, D}, X.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t c0 = 0; c0 < V; c0 += Vc) {
    const int64_t n = std::min(Vc, V - c0);
    at::Tensor w_chunk = w_buf.narrow(0, 0, n);
    at::index_select_out(w_chunk, w, 0, idx.narrow(0, c0, n));
    const at::Tensor z = mm_acc(X, w_chunk.t(), acc).contiguous();  // [B, n], unscaled x.w
    lse_update_kernel<acc_t><<<B, kThreads, 0, stream>>>(z.data_ptr<acc_t>(), n, c0, V, scale.data_ptr<acc_t>(),
                                                         target_pos.data_ptr<int64_t>(), row_max.data_ptr<acc_t>(),
                                                         row_sum.data_ptr<acc_t>(), target_logit.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void backward_chunks(const at::Tensor& g, const at::Tensor& X, const at::Tensor& w, const at::Tensor& idx,
                     const at::Tensor& target_pos, const at::Tensor& scale, const at::Tensor& lse, bool need_grad_x,
                     bool need_grad_w, at::Tensor& grad_x_acc, at::Tensor& grad_w, at::Tensor& row_dscale) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = lse.scalar_type();
  const int64_t B = X.size(0), D = X.size(1), V = idx.numel();
  const int64_t bytes_per_col = B * (sizeof(acc_t) + sizeof(scalar_t)) + 2 * D * sizeof(scalar_t);
  const int64_t Vc = chunk_cols(V, bytes_per_col, kCudaChunkBytes, 64);
  at::Tensor w_buf = at::empty({Vc, D}, X.options());
  at::Tensor dz_buf = at::empty({B * Vc}, X.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t c0 = 0; c0 < V; c0 += Vc) {
    const int64_t n = std::min(Vc, V - c0);
    const at::Tensor idx_chunk = idx.narrow(0, c0, n);
    at::Tensor w_chunk = w_buf.narrow(0, 0, n);
    at::index_select_out(w_chunk, w, 0, idx_chunk);
    const at::Tensor z = mm_acc(X, w_chunk.t(), acc).contiguous();  // [B, n], unscaled x.w, recomputed
    at::Tensor dz = dz_buf.narrow(0, 0, B * n).view({B, n});        // d loss / d(x.w), input dtype
    dlogits_kernel<scalar_t, acc_t><<<B, kThreads, 0, stream>>>(z.data_ptr<acc_t>(), n, c0, V, scale.data_ptr<acc_t>(),
                                                               target_pos.data_ptr<int64_t>(), lse.data_ptr<acc_t>(),
                                                               g.data_ptr<acc_t>(), dz.data_ptr<scalar_t>(),
                                                               row_dscale.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_grad_x && grad_x_acc.scalar_type() == X.scalar_type()) {  // fp32 / fp64: accumulate in place
      if (c0 == 0) at::mm_out(grad_x_acc, dz, w_chunk);
      else grad_x_acc.addmm_(dz, w_chunk);
    } else if (need_grad_x) {  // fp16 / bf16: fp32 accumulator across chunks
      const at::Tensor part = mm_acc(dz, w_chunk, acc);
      if (c0 == 0) grad_x_acc.copy_(part);
      else grad_x_acc.add_(part);
    }
    if (need_grad_w) {
      grad_w.index_copy_(0, idx_chunk, at::mm(dz.t(), X));  // idx is unique: every row is written once
    }
  }
}

std::tuple<at::Tensor, at::Tensor> xent_forward_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx_in,
                                                     const at::Tensor& target_pos_in, const at::Tensor& scale) {
  check_kernel_args(x, w, idx_in, target_pos_in, scale);
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor X = x.contiguous(), idx = idx_in.contiguous(), target_pos = target_pos_in.contiguous();
  const at::Tensor scale_acc = scale.to(acc).contiguous();  // read on the device: no host sync
  const int64_t B = X.size(0);
  at::Tensor row_max = at::full({B}, -std::numeric_limits<double>::infinity(), X.options().dtype(acc));
  at::Tensor row_sum = at::zeros({B}, X.options().dtype(acc));
  at::Tensor target_logit = at::zeros({B}, X.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "proto_ce_xent_forward_cuda", [&] {
    forward_chunks<scalar_t>(X, w, idx, target_pos, scale_acc, row_max, row_sum, target_logit);
  });
  at::Tensor lse = row_max + row_sum.log();
  return {lse - target_logit, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> xent_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx_in,
    const at::Tensor& target_pos_in, const at::Tensor& scale, const at::Tensor& lse_in, bool need_grad_x,
    bool need_grad_w, bool need_grad_scale) {
  check_kernel_args(x, w, idx_in, target_pos_in, scale);
  check_backward_args(grad_loss, lse_in, x);
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor grad_x_acc = need_grad_x ? at::empty({B, D}, x.options().dtype(acc)) : at::empty({0}, x.options());
  at::Tensor grad_w = need_grad_w ? at::zeros(w.sizes(), w.options()) : at::empty({0}, w.options());
  at::Tensor row_dscale = at::zeros({B}, x.options().dtype(acc));
  if (need_grad_x || need_grad_w || need_grad_scale) {
    const at::Tensor X = x.contiguous(), idx = idx_in.contiguous(), target_pos = target_pos_in.contiguous();
    const at::Tensor g = grad_loss.to(acc).contiguous(), lse = lse_in.to(acc).contiguous();
    const at::Tensor scale_acc = scale.to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "proto_ce_xent_backward_cuda", [&] {
      backward_chunks<scalar_t>(g, X, w, idx, target_pos, scale_acc, lse, need_grad_x, need_grad_w, grad_x_acc,
                                grad_w, row_dscale);
    });
  }
  return {need_grad_x ? grad_x_acc.to(x.scalar_type()) : grad_x_acc, grad_w,
          need_grad_scale ? row_dscale.sum().to(scale.scalar_type()) : at::empty({0}, scale.options())};
}

// One-pass kernel for a row block (xent_fused), one thread block per row r of z [nb, V] (all V columns):
// loss[r] = logsumexp(s * z[r]) - s * z[r, target]; if `grads`, pmy[r] = softmax(s * z[r]) - onehot in the
// input dtype (the operand of the tensor-core matmuls that follow).
template <typename scalar_t, typename acc_t>
__global__ void fused_rows_kernel(const acc_t* __restrict__ Z, int64_t V, const acc_t* __restrict__ scale,
                                  const int64_t* __restrict__ target_pos, acc_t* __restrict__ loss,
                                  scalar_t* __restrict__ pmy, bool grads) {
  __shared__ acc_t shared[32];
  const int64_t r = blockIdx.x;
  const acc_t* row = Z + r * V;
  const acc_t s = *scale;
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) row_max = MaxOp<acc_t>()(row_max, s * row[j]);
  row_max = block_reduce(row_max, MaxOp<acc_t>(), -std::numeric_limits<acc_t>::infinity(), shared);
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) sum += exp(s * row[j] - row_max);
  sum = block_reduce(sum, SumOp<acc_t>(), acc_t(0), shared);
  const int64_t t = target_pos[r];
  CUDA_KERNEL_ASSERT(t >= 0 && t < V);
  if (threadIdx.x == 0) loss[r] = row_max + log(sum) - s * row[t];
  if (!grads) return;
  const acc_t inv = acc_t(1) / sum;
  scalar_t* out = pmy + r * V;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    out[j] = static_cast<scalar_t>(exp(s * row[j] - row_max) * inv - (j == t ? acc_t(1) : acc_t(0)));
  }
}

// Loss (mean or sum) and its gradients for an upstream gradient of 1 in one pass (see ops.cpp): row
// blocks of x meet all V gathered prototypes; per block Z = X_b w[idx]^T (fp32), the row kernel, then
// G = (P - Y) w[idx] gives dx = coef * G and dscale rows x_b . G_b, and dw[idx] accumulates (P - Y)^T X_b
// in fp32 in a fixed order. Three matmuls per block, and the block's [rows, V] buffers are the only
// ones of that kind.
template <typename scalar_t>
void fused_blocks(const at::Tensor& X, const at::Tensor& w_idx, const at::Tensor& target_pos, const at::Tensor& scale,
                  const at::Tensor& coef, bool grads, bool need_grad_x, bool need_grad_w, bool need_grad_scale,
                  at::Tensor& row_loss, at::Tensor& row_dscale, at::Tensor& grad_x, at::Tensor& grad_w_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = row_loss.scalar_type();
  const int64_t B = X.size(0), V = w_idx.size(0);
  const int64_t bytes_per_row = V * static_cast<int64_t>(sizeof(acc_t) + sizeof(scalar_t));
  const int64_t Bb = chunk_rows(B, bytes_per_row, kCudaChunkBytes, 128);
  at::Tensor pmy_buf = grads ? at::empty({Bb * V}, X.options()) : at::empty({0}, X.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t b0 = 0; b0 < B; b0 += Bb) {
    const int64_t nb = std::min(Bb, B - b0);
    const at::Tensor x_block = X.narrow(0, b0, nb);
    const at::Tensor z = mm_acc(x_block, w_idx.t(), acc).contiguous();  // [nb, V], unscaled x.w
    at::Tensor pmy = grads ? pmy_buf.narrow(0, 0, nb * V).view({nb, V}) : pmy_buf;
    fused_rows_kernel<scalar_t, acc_t><<<nb, kThreads, 0, stream>>>(
        z.data_ptr<acc_t>(), V, scale.data_ptr<acc_t>(), target_pos.data_ptr<int64_t>() + b0,
        row_loss.data_ptr<acc_t>() + b0, grads ? pmy.data_ptr<scalar_t>() : nullptr, grads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_grad_x || need_grad_scale) {
      const at::Tensor g = mm_acc(pmy, w_idx, acc);  // [nb, D] = (P - Y) w[idx]
      if (need_grad_scale) {
        at::Tensor dscale_block = row_dscale.narrow(0, b0, nb);
        at::sum_out(dscale_block, g * x_block.to(acc), {1});
      }
      if (need_grad_x) {
        at::Tensor grad_x_block = grad_x.narrow(0, b0, nb);
        at::mul_out(grad_x_block, g, coef);
      }
    }
    if (need_grad_w) {  // accumulate (P - Y)^T X_b unscaled; scaled by coef once at the end
      if (acc == X.scalar_type()) grad_w_rows.addmm_(pmy.t(), x_block);
      else grad_w_rows.add_(mm_acc(pmy.t(), x_block, acc));
    }
  }
  if (need_grad_w) grad_w_rows.mul_(coef);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> xent_fused_cuda(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx_in, const at::Tensor& target_pos_in,
    const at::Tensor& scale, bool mean, bool need_grad_x, bool need_grad_w, bool need_grad_scale) {
  check_kernel_args(x, w, idx_in, target_pos_in, scale);
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor X = x.contiguous(), idx = idx_in.contiguous(), target_pos = target_pos_in.contiguous();
  const at::Tensor scale_acc = scale.to(acc).contiguous();  // read on the device: no host sync
  const int64_t B = X.size(0), D = X.size(1), V = idx.numel();
  const double row_weight = mean ? 1.0 / static_cast<double>(B) : 1.0;
  const at::Tensor coef = scale_acc * row_weight;  // d loss / d(x.w) = coef * (P - Y)
  const bool grads = need_grad_x || need_grad_w || need_grad_scale;
  const at::Tensor w_idx = w.index_select(0, idx);  // [V, D], as eager's w[idx]
  at::Tensor grad_x = need_grad_x ? at::empty({B, D}, X.options().dtype(acc)) : at::empty({0}, X.options().dtype(acc));
  at::Tensor grad_w_rows = need_grad_w ? at::zeros({V, D}, X.options().dtype(acc)) : at::empty({0}, X.options().dtype(acc));
  at::Tensor row_loss = at::empty({B}, X.options().dtype(acc));
  at::Tensor row_dscale = at::empty({B}, X.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "proto_ce_xent_fused_cuda", [&] {
    fused_blocks<scalar_t>(X, w_idx, target_pos, scale_acc, coef, grads, need_grad_x, need_grad_w, need_grad_scale,
                           row_loss, row_dscale, grad_x, grad_w_rows);
  });
  const at::Tensor loss = row_loss.sum().mul_(row_weight);
  at::Tensor grad_scale = need_grad_scale ? row_dscale.sum().mul_(row_weight) : at::empty({0}, X.options().dtype(acc));
  at::Tensor grad_w = need_grad_w ? dense_prototype_grad(grad_w_rows, idx, w) : at::empty({0}, w.options());
  return {loss, grad_x, grad_w, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(proto_ce, CUDA, m) {
  m.impl("label_positions", &label_positions_cuda);
  m.impl("xent_forward", &xent_forward_cuda);
  m.impl("xent_backward", &xent_backward_cuda);
  m.impl("xent_fused", &xent_fused_cuda);
}

}  // namespace proto_ce
