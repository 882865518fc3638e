// CPU kernels of the hard-label subsampled-prototype cross-entropy (see ops.cpp for the schemas).
//
// xent_fused (reduction mean / sum): row blocks of x meet all V = idx.numel() gathered prototypes at
// once; one BLAS matmul gives the block's logits [rows, V] (sized to stay in cache), two fused row loops
// and ATen's vectorised exp give the exact log-sum-exp, the loss and softmax - onehot, and two more
// matmuls give the block's dx and its contribution to dw[idx]. Gradients are computed for an upstream
// gradient of 1 during the forward pass; the autograd formula only scales them.
// xent_forward / xent_backward (reduction none, arbitrary per-sample upstream gradients): chunks of Vc
// columns, an online log-sum-exp in the forward pass, and a backward pass that recomputes each chunk's
// logits from the saved log-sum-exp.
// Neither materialises [B, K] nor [B, V]. No atomics, fixed reduction orders: results are bit-identical
// run to run for a fixed number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "proto_ce.h"

namespace proto_ce {
namespace {

// Working-set budget of one [B, Vc] chunk of logits (about half an L2 cache of a current x86 core).
constexpr int64_t kCpuChunkBytes = 512 * 1024;

// Bytes one prototype column of a chunk costs: one logit per row of x, in the accumulation dtype.
int64_t cpu_bytes_per_col(const at::Tensor& x) {
  return x.size(0) * static_cast<int64_t>(c10::elementSize(acc_dtype(x.scalar_type())));
}

at::Tensor label_positions_cpu(const at::Tensor& idx, const at::Tensor& labels, int64_t num_classes) {
  check_label_args(idx, labels);
  const at::Tensor idx_c = idx.contiguous();
  const at::Tensor labels_c = labels.contiguous();
  const int64_t V = idx_c.numel();
  const int64_t* id = idx_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < V; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < num_classes, "proto_ce: idx contains class id ", id[i],
                " outside [0, ", num_classes, ") (w has ", num_classes, " rows)");
    if (i > 0) {
      TORCH_CHECK(id[i] != id[i - 1], "proto_ce: idx contains duplicate class id ", id[i],
                  " (idx must be sorted and unique)");
      TORCH_CHECK(id[i] > id[i - 1], "proto_ce: idx is not sorted (idx[", i - 1, "]=", id[i - 1],
                  " > idx[", i, "]=", id[i], "); use torch.sort or torch.unique");
    }
  }
  at::Tensor pos = at::empty_like(labels_c);
  const int64_t* lab = labels_c.data_ptr<int64_t>();
  int64_t* out = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < labels_c.numel(); ++b) {
    const int64_t* hit = std::lower_bound(id, id + V, lab[b]);
    TORCH_CHECK(hit != id + V && *hit == lab[b], "proto_ce: labels contain class id ", lab[b],
                " (labels[", b, "]) which is not in idx; every label must be a sampled class");
    out[b] = hit - id;
  }
  return pos;
}

// Copies, for every row b whose target lies in the chunk [c0, c0 + n), logits[b, target - c0] into
// picked[b] (forward), or subtracts grad[b] there (backward: softmax - onehot).
template <typename acc_t>
void pick_targets(const at::Tensor& chunk, const at::Tensor& target_pos, int64_t c0, const at::Tensor& picked) {
  const int64_t B = chunk.size(0), n = chunk.size(1);
  const acc_t* z = chunk.data_ptr<acc_t>();
  const int64_t* t = target_pos.data_ptr<int64_t>();
  acc_t* out = picked.data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t j = t[b] - c0;
    if (j >= 0 && j < n) out[b] = z[b * n + j];
  }
}

template <typename acc_t>
void subtract_at_targets(const at::Tensor& chunk, const at::Tensor& target_pos, int64_t c0, const at::Tensor& grad) {
  const int64_t B = chunk.size(0), n = chunk.size(1);
  acc_t* z = chunk.data_ptr<acc_t>();
  const int64_t* t = target_pos.data_ptr<int64_t>();
  const acc_t* g = grad.data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t j = t[b] - c0;
    if (j >= 0 && j < n) z[b * n + j] -= g[b];
  }
}

std::tuple<at::Tensor, at::Tensor> xent_forward_cpu(const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& idx, const at::Tensor& target_pos,
                                                    const at::Tensor& scale) {
  check_kernel_args(x, w, idx, target_pos, scale);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor X = x.contiguous().to(acc);  // no copy for float32 / float64 inputs
  const at::Tensor tpos = target_pos.contiguous();
  const double s = scale.item<double>();
  const int64_t B = X.size(0), V = idx.numel();
  const int64_t Vc = chunk_cols(V, cpu_bytes_per_col(X), kCpuChunkBytes, 16);

  at::Tensor lse = at::full({B}, -std::numeric_limits<double>::infinity(), X.options());
  at::Tensor target_logit = at::zeros({B}, X.options());
  for (int64_t c0 = 0; c0 < V; c0 += Vc) {
    const int64_t n = std::min(Vc, V - c0);
    const at::Tensor w_chunk = w.index_select(0, idx.narrow(0, c0, n)).to(acc);  // [n, D]
    const at::Tensor logits = at::mm(X, w_chunk.t()).mul_(s);                     // [B, n]
    lse = at::logaddexp(lse, at::logsumexp(logits, {1}));
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_pick_targets",
                               [&] { pick_targets<scalar_t>(logits, tpos, c0, target_logit); });
  }
  return {lse - target_logit, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> xent_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx,
    const at::Tensor& target_pos, const at::Tensor& scale, const at::Tensor& lse, bool need_grad_x,
    bool need_grad_w, bool need_grad_scale) {
  check_kernel_args(x, w, idx, target_pos, scale);
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t B = x.size(0), D = x.size(1), V = idx.numel();
  at::Tensor grad_x = need_grad_x ? at::zeros({B, D}, x.options().dtype(acc)) : at::empty({0}, x.options());
  at::Tensor grad_w = need_grad_w ? at::zeros(w.sizes(), w.options()) : at::empty({0}, w.options());
  at::Tensor grad_scale = at::zeros({}, scale.options().dtype(acc));
  if (need_grad_x || need_grad_w || need_grad_scale) {
    const at::Tensor X = x.contiguous().to(acc);
    const at::Tensor tpos = target_pos.contiguous();
    const at::Tensor g = grad_loss.to(acc).contiguous();
    const at::Tensor lse_col = lse.to(acc).unsqueeze(1);
    const at::Tensor g_col = g.unsqueeze(1);
    const double s = scale.item<double>();
    const int64_t Vc = chunk_cols(V, cpu_bytes_per_col(X), kCpuChunkBytes, 16);
    for (int64_t c0 = 0; c0 < V; c0 += Vc) {
      const int64_t n = std::min(Vc, V - c0);
      const at::Tensor idx_chunk = idx.narrow(0, c0, n);
      const at::Tensor w_chunk = w.index_select(0, idx_chunk).to(acc);  // [n, D]
      at::Tensor z = at::mm(X, w_chunk.t());                              // [B, n], unscaled x.w
      // dlogits = g * (softmax - onehot), with softmax recomputed from the saved log-sum-exp.
      at::Tensor dlogits = at::mul(z, s).sub_(lse_col).exp_().mul_(g_col);
      AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_subtract_targets",
                                 [&] { subtract_at_targets<scalar_t>(dlogits, tpos, c0, g); });
      // d loss / d scale = sum dlogits * (x.w): no division by a possibly-zero scale.
      if (need_grad_scale) grad_scale.add_(z.mul_(dlogits).sum());
      at::Tensor dz = dlogits.mul_(s);  // d loss / d (x.w)
      if (need_grad_x) grad_x.addmm_(dz, w_chunk);
      if (need_grad_w) grad_w.index_copy_(0, idx_chunk, at::mm(dz.t(), X).to(w.scalar_type()));
    }
  }
  return {need_grad_x ? grad_x.to(x.scalar_type()) : grad_x, grad_w,
          need_grad_scale ? grad_scale.to(scale.scalar_type()) : at::empty({0}, scale.options())};
}

// Budget of one row block's [rows, V] logits in xent_fused (it holds two such buffers), and the fewest
// rows a block may have: the matmuls run once per block, and fewer, larger matmuls keep their speed
// (also on a loaded machine, where every parallel region waits for its slowest thread).
constexpr int64_t kCpuRowBlockBytes = 8 * 1024 * 1024;
constexpr int64_t kCpuMinRows = 256;

// Rows per task of at::parallel_for in the row loops: at least 256K elements per task, so that small
// blocks run inline on the calling thread. (A parallel region costs microseconds on an idle machine but
// milliseconds on a loaded one, where it waits for a descheduled thread.)
int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(row_length, 1)); }

// First pass over a block of unscaled logits z [nb, V]: e = s*z - rowmax(s*z) (the caller then applies
// ATen's vectorised exp to e), and each row's max and target logit s*z[target].
template <typename acc_t>
void shift_rows(const acc_t* z, acc_t* e, acc_t* row_max, acc_t* target_logit, const int64_t* target, int64_t nb,
                int64_t V, acc_t s) {
  at::parallel_for(0, nb, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* zr = z + r * V;
      acc_t* er = e + r * V;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < V; ++j) m = std::max(m, s * zr[j]);
      for (int64_t j = 0; j < V; ++j) er[j] = s * zr[j] - m;
      target_logit[r] = s * zr[target[r]];
      row_max[r] = m;
    }
  });
}

// Second pass, with e = exp(s*z - rowmax): loss[r] = logsumexp - target logit; if `grads`, e becomes
// d loss / d(x.w) = coef * (softmax - onehot) in place, and dscale[r] = sum_j (softmax - onehot)_j z_j
// (the scale's gradient, from the unscaled z: no division by a possibly-zero scale).
template <typename acc_t>
void finish_rows(const acc_t* z, acc_t* e, const acc_t* row_max, const acc_t* target_logit, const int64_t* target,
                 acc_t* loss, acc_t* dscale, int64_t nb, int64_t V, acc_t coef, bool grads) {
  at::parallel_for(0, nb, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* zr = z + r * V;
      acc_t* er = e + r * V;
      acc_t part[4] = {0, 0, 0, 0};  // four running sums: a fixed order, and fewer dependent adds
      int64_t j = 0;
      for (; j + 4 <= V; j += 4) {
        for (int k = 0; k < 4; ++k) part[k] += er[j + k];
      }
      for (; j < V; ++j) part[0] += er[j];
      const acc_t sum = (part[0] + part[1]) + (part[2] + part[3]);
      loss[r] = row_max[r] + std::log(sum) - target_logit[r];
      if (!grads) continue;
      const acc_t inv = acc_t(1) / sum;
      acc_t pz[4] = {0, 0, 0, 0};  // sum_j p_j z_j, four running sums
      for (j = 0; j + 4 <= V; j += 4) {
        for (int k = 0; k < 4; ++k) {
          const acc_t p = er[j + k] * inv;
          pz[k] += p * zr[j + k];
          er[j + k] = p * coef;
        }
      }
      for (; j < V; ++j) {
        const acc_t p = er[j] * inv;
        pz[0] += p * zr[j];
        er[j] = p * coef;
      }
      const int64_t t = target[r];
      er[t] -= coef;
      dscale[r] = ((pz[0] + pz[1]) + (pz[2] + pz[3])) - zr[t];
    }
  });
}

// Loss (mean or sum over rows) and its gradients in one pass: every row block meets all V columns, so
// its log-sum-exp is exact and dZ = coef * (softmax - onehot) is formed right away. Per block: the
// logits matmul, two fused row loops around ATen's vectorised exp, dx = dZ w[idx] and dw[idx] += dZ^T x.
// Three matmuls in all, as many as eager's forward + backward; [rows, V] buffers exist for one block only.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> xent_fused_cpu(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx, const at::Tensor& target_pos,
    const at::Tensor& scale, bool mean, bool need_grad_x, bool need_grad_w, bool need_grad_scale) {
  check_kernel_args(x, w, idx, target_pos, scale);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor X = x.contiguous().to(acc);
  const at::Tensor tpos = target_pos.contiguous();
  const double s = scale.item<double>();
  const int64_t B = X.size(0), D = X.size(1), V = idx.numel();
  const double row_weight = mean ? 1.0 / static_cast<double>(B) : 1.0;
  const double coef = row_weight * s;  // d loss / d(x.w) = coef * (softmax - onehot)
  const bool grads = need_grad_x || need_grad_w || need_grad_scale;
  const at::Tensor w_idx = w.index_select(0, idx).to(acc);  // [V, D], as eager's w[idx]
  at::Tensor grad_x = need_grad_x ? at::empty({B, D}, X.options()) : at::empty({0}, X.options());
  // written by the first row block's matmul (beta = 0), accumulated by the others in block order
  at::Tensor grad_w_rows = need_grad_w ? at::empty({V, D}, X.options()) : at::empty({0}, X.options());
  at::Tensor row_loss = at::empty({B}, X.options());
  at::Tensor row_dscale = at::empty({B}, X.options());
  at::Tensor row_max = at::empty({B}, X.options());
  at::Tensor target_logit = at::empty({B}, X.options());
  const int64_t Bb = chunk_rows(B, V * static_cast<int64_t>(c10::elementSize(acc)), kCpuRowBlockBytes, kCpuMinRows);
  for (int64_t b0 = 0; b0 < B; b0 += Bb) {
    const int64_t nb = std::min(Bb, B - b0);
    const at::Tensor x_block = X.narrow(0, b0, nb);
    const at::Tensor z = at::mm(x_block, w_idx.t());  // [nb, V], unscaled x.w
    at::Tensor e = at::empty_like(z);                  // s*z - max, then exp, then dZ
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_shift_rows", [&] {
      shift_rows<scalar_t>(z.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), row_max.data_ptr<scalar_t>() + b0,
                           target_logit.data_ptr<scalar_t>() + b0, tpos.data_ptr<int64_t>() + b0, nb, V,
                           static_cast<scalar_t>(s));
    });
    e.exp_();
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_finish_rows", [&] {
      finish_rows<scalar_t>(z.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), row_max.data_ptr<scalar_t>() + b0,
                            target_logit.data_ptr<scalar_t>() + b0, tpos.data_ptr<int64_t>() + b0,
                            row_loss.data_ptr<scalar_t>() + b0, row_dscale.data_ptr<scalar_t>() + b0, nb, V,
                            static_cast<scalar_t>(coef), grads);
    });
    if (need_grad_x) {
      at::Tensor grad_x_block = grad_x.narrow(0, b0, nb);
      at::mm_out(grad_x_block, e, w_idx);
    }
    if (need_grad_w) grad_w_rows.addmm_(e.t(), x_block, b0 == 0 ? 0.0 : 1.0, 1.0);  // beta = 0: no zero fill
  }
  const at::Tensor loss = row_loss.sum().mul_(row_weight);
  at::Tensor grad_scale = need_grad_scale ? row_dscale.sum().mul_(row_weight) : at::empty({0}, X.options());
  return {loss, grad_x, grad_w_rows, grad_scale};
}

// out [num_rows, D] of `dtype`: zero, except out[idx[i]] = rows[i] * factor. The w gradient of xent_fused's
// autograd formula, written without an intermediate [V, D] copy.
at::Tensor scatter_rows_cpu(const at::Tensor& rows, const at::Tensor& idx, const at::Tensor& factor,
                            int64_t num_rows, at::ScalarType dtype) {
  TORCH_CHECK(rows.dim() == 2 && idx.dim() == 1 && idx.scalar_type() == at::kLong &&
                  idx.numel() == rows.size(0) && factor.dim() == 0,
              "proto_ce: scatter_rows needs rows [V, D], idx [V] int64 and a 0-d factor");
  at::Tensor out = at::zeros({num_rows, rows.size(1)}, rows.options().dtype(dtype));
  if (dtype != rows.scalar_type() || !at::isFloatingType(dtype) || dtype == at::kHalf || dtype == at::kBFloat16) {
    out.index_copy_(0, idx, rows.mul(factor).to(dtype));
    return out;
  }
  const at::Tensor src = rows.contiguous(), id = idx.contiguous();
  const int64_t V = src.size(0), D = src.size(1);
  AT_DISPATCH_FLOATING_TYPES(dtype, "proto_ce_scatter_rows", [&] {
    const scalar_t f = factor.item<scalar_t>();
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t* rows_at = id.data_ptr<int64_t>();
    at::parallel_for(0, V, row_grain(D), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        TORCH_CHECK(rows_at[i] >= 0 && rows_at[i] < num_rows, "proto_ce: scatter_rows index out of range");
        for (int64_t d = 0; d < D; ++d) dst[rows_at[i] * D + d] = in[i * D + d] * f;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(proto_ce, CPU, m) {
  m.impl("label_positions", &label_positions_cpu);
  m.impl("xent_forward", &xent_forward_cpu);
  m.impl("xent_backward", &xent_backward_cpu);
  m.impl("xent_fused", &xent_fused_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
}

}  // namespace proto_ce
