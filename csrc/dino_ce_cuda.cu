// CUDA kernels of the DINO soft-target loss over a prototype subset (math and notation: dino_ce_cpu.cpp).
//
// Chunked like the CPU kernels and like the hard-label op's proto_ce_cuda.cu: per chunk of Vc prototype
// columns, gather the chunk's prototype rows (index_select), one ATen/cuBLAS matmul per logit block with
// fp32 output and fp32 accumulation (tensor cores for fp16/bf16 inputs, via the aten::mm.dtype overload of
// torch >= 2.8), then custom kernels for the softmax arithmetic -- one block per row: the student's online
// log-sum-exp; the teacher's online softmax with the rescale factor of its U row; column sums of the raw
// teacher logits for the centre -- and matmuls again for U and the gradients (probabilities cast to the
// input dtype for the tensor-core GEMMs, as dlogits are in proto_ce_cuda.cu; U stays in fp32 because the
// loss value is built from it). Only [rows, Vc] and [Vc, D] buffers exist (Vc sized to kCudaChunkBytes),
// never [rows, V] or [rows, K]. Reductions are fixed trees (warp shuffles, then one warp) and the column
// sums loop over rows in order: no atomics, bit-identical results run to run. ATen matmuls (not raw
// cuBLAS) keep this file free of cuBLAS/cuSPARSE headers, which nvcc-only toolkits lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <limits>

#include "proto_ce.h"

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define DINO_CE_HAVE_MM_OUT_DTYPE 1
#else
#define DINO_CE_HAVE_MM_OUT_DTYPE 0
#endif

namespace proto_ce {
namespace dino {
// Device-independent pieces, defined in dino_ce_cpu.cpp.
int64_t num_pairs(int64_t n_crops, int64_t n_global);
void check_args(const at::Tensor& S, const at::Tensor& T, const at::Tensor& Ws, const at::Tensor& Wt,
                const at::Tensor& idx, const at::Tensor& center, double tau_s, double tau_t, int64_t n_global,
                bool check_values);
at::Tensor paired_teacher_sum(const at::Tensor& U, int64_t B, int64_t n_crops, int64_t n_global);
at::Tensor paired_student_sum(const at::Tensor& S, int64_t B, int64_t n_crops, int64_t n_global);
at::Tensor partner_counts(int64_t B, int64_t n_crops, int64_t n_global, const at::TensorOptions& options);
at::Tensor assemble_loss(const at::Tensor& S, const at::Tensor& lse_s, const at::Tensor& U, double tau_s,
                         int64_t B, int64_t n_crops, int64_t n_global);
}  // namespace dino

namespace {

using namespace dino;

// Budget of the [rows_s + rows_t, Vc] float32 logit chunks: small next to the [rows, V] tensors of an
// eager implementation, large enough that each GEMM keeps the GPU busy.
constexpr int64_t kCudaChunkBytes = 16 * 1024 * 1024;
constexpr int kThreads = 256;  // threads per row block (a multiple of 32)

// a [r, k] times b_t [k, c] -> [r, c] in the accumulation dtype (fp32 output for fp16/bf16 operands).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b_t, at::ScalarType acc) {
  if (a.scalar_type() == acc && b_t.scalar_type() == acc) return at::mm(a, b_t);
#if DINO_CE_HAVE_MM_OUT_DTYPE
  return at::mm(a, b_t, acc);
#else
  return at::mm(a, b_t).to(acc);
#endif
}

template <typename T>
__device__ __forceinline__ T exp_(T x);
template <>
__device__ __forceinline__ float exp_<float>(float x) { return expf(x); }
template <>
__device__ __forceinline__ double exp_<double>(double x) { return exp(x); }

// Block-wide max / sum in a fixed tree (warp shuffles, then warp 0), broadcast to every thread.
template <typename T, bool kMax>
__device__ T block_reduce(T v, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other = __shfl_down_sync(0xffffffff, v, offset);
    v = kMax ? (other > v ? other : v) : v + other;
  }
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? shared[lane] : (kMax ? -std::numeric_limits<T>::infinity() : T(0));
    for (int offset = 16; offset > 0; offset /= 2) {
      const T other = __shfl_down_sync(0xffffffff, v, offset);
      v = kMax ? (other > v ? other : v) : v + other;
    }
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const T result = shared[0];
  __syncthreads();  // shared may be reused by the next reduction
  return result;
}

// One block per student row: fold logits * inv_tau of the chunk into the running (max, sum of exp).
template <typename T>
__global__ void student_online_lse_kernel(const T* __restrict__ logits, int64_t cols, T inv_tau,
                                          T* __restrict__ run_max, T* __restrict__ run_sum) {
  __shared__ T shared[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * cols;
  const T old_max = run_max[row];
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) m = max(m, x[j] * inv_tau);
  const T new_max = max(old_max, block_reduce<T, true>(m, shared));
  T s = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) s += exp_<T>(x[j] * inv_tau - new_max);
  s = block_reduce<T, false>(s, shared);
  if (threadIdx.x == 0) {
    run_sum[row] = run_sum[row] * exp_<T>(old_max - new_max) + s;  // exp(-inf) = 0 on the first chunk
    run_max[row] = new_max;
  }
}

// One block per teacher row: z = (t - centre) * inv_tau folded into the running (max, sum of exp); the
// chunk is overwritten with exp(z - new max) and rescale[row] = exp(old max - new max) (for the U row).
template <typename T>
__global__ void teacher_online_softmax_kernel(T* __restrict__ logits, const T* __restrict__ center, int64_t cols,
                                              T inv_tau, T* __restrict__ run_max, T* __restrict__ run_sum,
                                              T* __restrict__ rescale) {
  __shared__ T shared[kThreads / 32];
  const int64_t row = blockIdx.x;
  T* x = logits + row * cols;
  const T old_max = run_max[row];
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const T z = (x[j] - center[j]) * inv_tau;
    x[j] = z;
    m = max(m, z);
  }
  const T new_max = max(old_max, block_reduce<T, true>(m, shared));
  T s = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const T e = exp_<T>(x[j] - new_max);
    x[j] = e;
    s += e;
  }
  s = block_reduce<T, false>(s, shared);
  if (threadIdx.x == 0) {
    const T scale = exp_<T>(old_max - new_max);
    run_sum[row] = run_sum[row] * scale + s;
    run_max[row] = new_max;
    rescale[row] = scale;
  }
}

// out[j] = sum_r x[r, j], one thread per column, rows in ascending order.
template <typename T>
__global__ void column_sums_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, T* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  T s = 0;
  for (int64_t r = 0; r < rows; ++r) s += x[r * cols + j];
  out[j] = s;
}

// In place: x = exp((x - centre) * inv_tau - lse[row]) (centre may be null): the chunk's probabilities.
template <typename T>
__global__ void probabilities_kernel(T* __restrict__ x, const T* __restrict__ center, int64_t rows, int64_t cols,
                                     T inv_tau, const T* __restrict__ lse) {
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, j = i - r * cols;
    const T z = center ? x[i] - center[j] : x[i];
    x[i] = exp_<T>(z * inv_tau - lse[r]);
  }
}

int64_t cuda_chunk(int64_t V, int64_t rows, at::ScalarType acc) {
  return chunk_cols(V, rows * static_cast<int64_t>(c10::elementSize(acc)), kCudaChunkBytes, 128);
}

unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dino_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student, const at::Tensor& w_teacher,
    const at::Tensor& idx, const at::Tensor& center, double tau_s, double tau_t, int64_t n_global) {
  check_args(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global, true);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_dtype(student.scalar_type());
  const at::Tensor S = student.contiguous(), T = teacher.contiguous();  // the GEMMs read the input dtype
  const int64_t rows_s = S.size(0), rows_t = T.size(0), D = S.size(1), V = idx.numel();
  const int64_t B = rows_t / n_global, n_crops = rows_s / B;
  const auto opts = S.options().dtype(acc);
  const int64_t Vc = cuda_chunk(V, rows_s + rows_t, acc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor max_s = at::full({rows_s}, -inf, opts), sum_s = at::zeros({rows_s}, opts);
  at::Tensor max_t = at::full({rows_t}, -inf, opts), sum_t = at::zeros({rows_t}, opts);
  at::Tensor rescale = at::empty({rows_t}, opts);
  at::Tensor U = at::zeros({rows_t, D}, opts);
  at::Tensor colsum = at::empty({V}, opts);
  for (int64_t c0 = 0; c0 < V; c0 += Vc) {
    const int64_t n = std::min(Vc, V - c0);
    const at::Tensor idx_chunk = idx.narrow(0, c0, n);
    const at::Tensor ws_chunk = w_student.index_select(0, idx_chunk);  // [n, D], input dtype
    const at::Tensor wt_chunk = w_teacher.index_select(0, idx_chunk);
    const at::Tensor c_chunk = center.index_select(0, idx_chunk).to(acc).contiguous();
    const at::Tensor logits_s = mm_acc(S, ws_chunk.t(), acc);  // [rows_s, n] fp32
    at::Tensor logits_t = mm_acc(T, wt_chunk.t(), acc);        // [rows_t, n] fp32
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_dino_forward_cuda", [&] {
      column_sums_kernel<scalar_t><<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          logits_t.data_ptr<scalar_t>(), rows_t, n, colsum.data_ptr<scalar_t>() + c0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      student_online_lse_kernel<scalar_t><<<static_cast<unsigned>(rows_s), kThreads, 0, stream>>>(
          logits_s.data_ptr<scalar_t>(), n, static_cast<scalar_t>(1.0 / tau_s), max_s.data_ptr<scalar_t>(),
          sum_s.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      teacher_online_softmax_kernel<scalar_t><<<static_cast<unsigned>(rows_t), kThreads, 0, stream>>>(
          logits_t.data_ptr<scalar_t>(), c_chunk.data_ptr<scalar_t>(), n, static_cast<scalar_t>(1.0 / tau_t),
          max_t.data_ptr<scalar_t>(), sum_t.data_ptr<scalar_t>(), rescale.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // U_g += sum_j exp(z_gj - max_g) Ws[idx_j], in fp32 (the loss value is built from U)
    U.mul_(rescale.unsqueeze(1)).addmm_(logits_t, ws_chunk.to(acc));
  }
  U.div_(sum_t.unsqueeze(1));  // now U_g = sum_j p_gj Ws[idx_j]
  const at::Tensor lse_s = max_s + sum_s.log();
  const at::Tensor lse_t = max_t + sum_t.log();
  const at::Tensor loss = assemble_loss(S.to(acc), lse_s, U, tau_s, B, n_crops, n_global);
  return {loss, colsum, lse_s, lse_t, U};
}

std::tuple<at::Tensor, at::Tensor> dino_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student,
    const at::Tensor& w_teacher, const at::Tensor& idx, const at::Tensor& center, const at::Tensor& lse_student,
    const at::Tensor& lse_teacher, const at::Tensor& u, double tau_s, double tau_t, int64_t n_global,
    bool need_grad_student, bool need_grad_w) {
  check_args(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global, false);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_dtype(student.scalar_type());
  const auto in = student.scalar_type();
  const int64_t rows_s = student.size(0), rows_t = teacher.size(0), D = student.size(1), V = idx.numel();
  const int64_t B = rows_t / n_global, n_crops = rows_s / B;
  at::Tensor grad_s = at::empty({0}, student.options());
  at::Tensor grad_w = at::empty({0}, w_student.options());
  if (!need_grad_student && !need_grad_w) return {grad_s, grad_w};

  const at::Tensor S = student.contiguous(), T = teacher.contiguous();
  const auto opts = S.options().dtype(acc);
  const at::Tensor k = grad_loss.to(acc) / (static_cast<double>(num_pairs(n_crops, n_global) * B) * tau_s);
  const at::Tensor lse_s = lse_student.to(acc).contiguous(), lse_t = lse_teacher.to(acc).contiguous();
  const at::Tensor counts = partner_counts(B, n_crops, n_global, opts);  // [rows_s, 1]
  at::Tensor S_weighted, A, grad_w_idx, Q;
  if (need_grad_w) {
    S_weighted = (S.to(acc) * counts).to(in);                    // n_g(c) S_r (GEMM operand: input dtype)
    A = paired_student_sum(S.to(acc), B, n_crops, n_global).to(in);  // [rows_t, D]
    grad_w_idx = at::empty({V, D}, opts);
  }
  if (need_grad_student) Q = at::zeros({rows_s, D}, opts);  // sum_j P_s_rj Ws[idx_j]
  const int64_t Vc = cuda_chunk(V, rows_s + rows_t, acc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  for (int64_t c0 = 0; c0 < V; c0 += Vc) {
    const int64_t n = std::min(Vc, V - c0);
    const at::Tensor idx_chunk = idx.narrow(0, c0, n);
    const at::Tensor ws_chunk = w_student.index_select(0, idx_chunk);
    at::Tensor p_s = mm_acc(S, ws_chunk.t(), acc);  // student probabilities, recomputed from the saved lse
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_dino_backward_student_cuda", [&] {
      probabilities_kernel<scalar_t><<<elementwise_blocks(rows_s * n), kThreads, 0, stream>>>(
          p_s.data_ptr<scalar_t>(), nullptr, rows_s, n, static_cast<scalar_t>(1.0 / tau_s),
          lse_s.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor p_s_in = p_s.to(in);  // no copy for fp32 / fp64
    if (need_grad_student) Q.add_(mm_acc(p_s_in, ws_chunk, acc));
    if (need_grad_w) {
      const at::Tensor wt_chunk = w_teacher.index_select(0, idx_chunk);
      const at::Tensor c_chunk = center.index_select(0, idx_chunk).to(acc).contiguous();
      at::Tensor p_t = mm_acc(T, wt_chunk.t(), acc);  // teacher probabilities
      AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_dino_backward_teacher_cuda", [&] {
        probabilities_kernel<scalar_t><<<elementwise_blocks(rows_t * n), kThreads, 0, stream>>>(
            p_t.data_ptr<scalar_t>(), c_chunk.data_ptr<scalar_t>(), rows_t, n, static_cast<scalar_t>(1.0 / tau_t),
            lse_t.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      at::Tensor gw = grad_w_idx.narrow(0, c0, n);
      gw.copy_(mm_acc(p_s_in.t(), S_weighted, acc));
      gw.sub_(mm_acc(p_t.to(in).t(), A, acc));
    }
  }
  if (need_grad_w) grad_w = dense_prototype_grad(grad_w_idx.mul_(k), idx, w_student);
  if (need_grad_student) {
    const at::Tensor M = paired_teacher_sum(u.to(acc), B, n_crops, n_global);
    grad_s = Q.mul_(counts).sub_(M).mul_(k).to(student.scalar_type());
  }
  return {grad_s, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(proto_ce, CUDA, m) {
  m.impl("dino_forward", &dino_forward_cuda);
  m.impl("dino_backward", &dino_backward_cuda);
}

}  // namespace proto_ce
