// CPU kernels of the hard-label subsampled-prototype cross-entropy (see ops.cpp for the schemas).
//
// xent_fused (reduction mean / sum): row blocks of x meet all V = idx.numel() sampled prototypes at
// once; BLAS matmuls give the block's logits [rows, V] (sized to stay in cache), two fused row loops
// and ATen's vectorised exp give the exact log-sum-exp, the loss and softmax - onehot, and two more
// matmuls give the block's dx and its contribution to the dense dw. Gradients are computed for an upstream
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
  check_sorted_unique_ids(idx_c, num_classes, "class", "w has");
  at::Tensor pos = at::empty_like(labels_c);
  const int64_t* lab = labels_c.data_ptr<int64_t>();
  int64_t* out = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < labels_c.numel(); ++b) {
    const int64_t* hit = std::lower_bound(id, id + V, lab[b]);
    if (hit == id + V || *hit != lab[b]) fail_label_not_in_idx(lab[b], b);
    out[b] = hit - id;
  }
  return pos;
}

// Every target position within [0, V): the row loops index the logits with it. proto_ce.py computes the
// positions with label_positions; this guards direct torch.ops calls (a read out of bounds otherwise).
__attribute__((noinline)) void check_target_positions(const at::Tensor& target_pos, int64_t V) {
  const at::Tensor tpos = target_pos.contiguous();
  const int64_t* t = tpos.data_ptr<int64_t>();
  for (int64_t b = 0; b < tpos.numel(); ++b) {
    PROTO_CE_CHECK(t[b] >= 0 && t[b] < V, "proto_ce: target_pos[", b, "]=", t[b], " is outside [0, ", V,
                   ") (V = idx.numel())");
  }
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
  check_target_positions(target_pos, idx.numel());
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
  check_backward_args(grad_loss, lse, x);
  check_target_positions(target_pos, idx.numel());
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

// Budget of one row block's [rows, V] logits in xent_fused, and the fewest rows a block may have: the
// matmuls run once per block, and fewer, larger matmuls keep their speed (also on a loaded machine, where
// every parallel region waits for its slowest thread).
constexpr int64_t kCpuRowBlockBytes = 8 * 1024 * 1024;
constexpr int64_t kCpuMinRows = 256;

// Rows per task of at::parallel_for in the row loops: at least 256K elements per task, so that small
// blocks run inline on the calling thread. (A parallel region costs microseconds on an idle machine but
// milliseconds on a loaded one, where it waits for a descheduled thread.)
int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(row_length, 1)); }

// Rows per task in the loops that only move memory (gather, write, zero): ATen's own grain (32K elements),
// the one eager PyTorch's copies and fills use.
int64_t copy_grain(int64_t row_length) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(row_length, 1)); }

// out [V, n] (contiguous, accumulation dtype) = w[idx, d0:d0+n]: one slice of the sampled prototypes.
// The rows of w are scattered over memory and usually not in cache: each row's segment is prefetched two
// rows ahead (gathering w[idx] of the SL shape from a cold cache: ~73 us instead of ~100 us on the
// development CPU, benchmarks/NOTES_proto_ce.md).
template <typename w_t, typename acc_t>
void gather_slice(const at::Tensor& w, const int64_t* idx, int64_t V, int64_t d0, int64_t n, acc_t* out) {
  const w_t* src = w.data_ptr<w_t>();
  const int64_t D = w.size(1);
  constexpr int64_t kAhead = 2, kLine = 64;
  at::parallel_for(0, V, copy_grain(n), [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
#if defined(__GNUC__)
      if (v + kAhead < v1) {
        const char* ahead = reinterpret_cast<const char*>(src + idx[v + kAhead] * D + d0);
        for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(w_t)); b += kLine) __builtin_prefetch(ahead + b);
      }
#endif
      const w_t* row = src + idx[v] * D + d0;
      for (int64_t d = 0; d < n; ++d) out[v * n + d] = static_cast<acc_t>(row[d]);
    }
  });
}

// grad_w[idx, d0:d0+n] = rows [V, n] (the first row block) or += rows (the others). idx is unique, so
// every task owns its rows: no atomics, and each element's sum runs over the row blocks in order.
template <typename acc_t>
void write_rows(acc_t* grad_w, int64_t D, const int64_t* idx, int64_t V, int64_t d0, int64_t n, const acc_t* rows,
                bool accumulate) {
  at::parallel_for(0, V, copy_grain(n), [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      acc_t* dst = grad_w + idx[v] * D + d0;
      const acc_t* src = rows + v * n;
      if (accumulate) {
        for (int64_t d = 0; d < n; ++d) dst[d] += src[d];
      } else {
        std::copy(src, src + n, dst);
      }
    }
  });
}

// Zeroes the rows of grad_w [K, D] outside the sorted idx: the runs between consecutive sampled rows (the
// idx rows themselves are written by the first row block).
template <typename acc_t>
void zero_rows_outside(acc_t* grad_w, int64_t K, int64_t D, const int64_t* idx, int64_t V) {
  const int64_t gap_elements = std::max<int64_t>(1, (K - V) * D / (V + 1));  // on average
  at::parallel_for(0, V + 1, copy_grain(gap_elements), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t first = i == 0 ? 0 : idx[i - 1] + 1, end = i == V ? K : idx[i];
      std::fill(grad_w + first * D, grad_w + end * D, acc_t(0));
    }
  });
}

// Moves the dW rows [V, D], kept in the first V rows of the dense gradient [K, D], to their rows idx[v].
// idx is sorted and unique, so idx[v] >= v: rows bound beyond the first V (no source there) move in
// parallel, then the rest last one first, so that no row lands on one still to be moved.
template <typename acc_t>
void spread_rows(acc_t* grad_w, int64_t D, const int64_t* idx, int64_t V) {
  const int64_t first_far = std::lower_bound(idx, idx + V, V) - idx;
  at::parallel_for(first_far, V, copy_grain(D), [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) std::copy(grad_w + v * D, grad_w + (v + 1) * D, grad_w + idx[v] * D);
  });
  for (int64_t v = first_far - 1; v >= 0; --v) {
    if (idx[v] != v) std::copy(grad_w + v * D, grad_w + (v + 1) * D, grad_w + idx[v] * D);
  }
}

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

// A [rows, cols] matrix over the first rows * cols elements of a contiguous buffer (reused across blocks).
at::Tensor as_matrix(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

// Loss (mean or sum over rows) and its gradients in one pass: every row block meets all V columns, so
// its log-sum-exp is exact and dZ = coef * (softmax - onehot) is formed right away. Per block: the
// logits matmul, two fused row loops around ATen's vectorised exp, dx = dZ w[idx] and dw[idx] += dZ^T x.
// Three matmuls' work in all, as in eager's forward + backward.
//
// Memory: besides the returned gradients, nothing of size [V, D] or [B, V]. The block's logits z live
// in the rows of grad_x that the block writes last (dead by then). Where w needs a gradient, its dense
// [K, D] is returned anyway and is zero outside the V idx rows: when large enough (K >= 2V plus a block),
// it lends its memory to w[idx], the dW rows [V, D] and dZ, and the dW rows are moved to their idx rows at
// the end (the SL and DINO shapes). Otherwise (w frozen, or K close to V) w[idx] is gathered in slices of
// Dc embedding dimensions [V, Dc] no larger than a logits block, gathered again where a slice is needed
// twice (the copy costs about 1/rows of the matmul work that uses it), and each slice's w gradient goes
// straight into the dense gradient; where one slice holds all D, w[idx] is gathered once and dW summed
// in a [V, D] buffer.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> xent_fused_cpu(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx, const at::Tensor& target_pos,
    const at::Tensor& scale, bool mean, bool need_grad_x, bool need_grad_w, bool need_grad_scale) {
  check_kernel_args(x, w, idx, target_pos, scale);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor X = x.contiguous().to(acc);
  const at::Tensor W = w.contiguous();
  const at::Tensor id = idx.contiguous();
  // the dense w gradient is written at the idx rows: a direct torch.ops call must not write out of bounds
  check_sorted_unique_ids(id, W.size(0), "class", "w has");
  check_target_positions(target_pos, id.numel());
  const at::Tensor tpos = target_pos.contiguous();
  const double s = scale.item<double>();
  const int64_t B = X.size(0), D = X.size(1), K = W.size(0), V = id.numel();
  const double row_weight = mean ? 1.0 / static_cast<double>(B) : 1.0;
  const double coef = row_weight * s;  // d loss / d(x.w) = coef * (softmax - onehot)
  const bool grads = need_grad_x || need_grad_w || need_grad_scale;
  const int64_t elt = static_cast<int64_t>(c10::elementSize(acc));
  const int64_t Bb = chunk_rows(B, V * elt, kCpuRowBlockBytes, kCpuMinRows);
  const bool z_in_grad_x = need_grad_x && V <= D;
  const int64_t budget_dims = slice_dims(D, V * elt, Bb * V * elt, 16);
  // PROTO_CE_SLICE_DIMS below D forces the sliced path (tests)
  const bool in_grad_w = need_grad_w && K * D >= 2 * V * D + Bb * V * (z_in_grad_x ? 1 : 2) &&
                         !(budget_dims < D && std::getenv("PROTO_CE_SLICE_DIMS"));
  const int64_t Dc = in_grad_w ? D : budget_dims;
  const bool one_slice = Dc == D;  // then w[idx] is gathered once and serves every block

  auto zero_rows_outside_idx = [&](at::Tensor& dense) {
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_zero_rows_outside", [&] {
      zero_rows_outside<scalar_t>(dense.data_ptr<scalar_t>(), K, D, id.data_ptr<int64_t>(), V);
    });
  };
  auto dense_grad_w = [&] {  // [K, D] with the rows outside idx zeroed; the idx rows are written later
    at::Tensor dense = at::empty(W.sizes(), X.options());
    zero_rows_outside_idx(dense);
    return dense;
  };
  auto write_rows_into = [&](at::Tensor& dense, int64_t d0, const at::Tensor& rows, bool accumulate) {
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_write_rows", [&] {
      write_rows<scalar_t>(dense.data_ptr<scalar_t>(), D, id.data_ptr<int64_t>(), V, d0, rows.size(1),
                           rows.data_ptr<scalar_t>(), accumulate);
    });
  };
  auto gather_into = [&](at::Tensor& out, int64_t d0, int64_t n) {  // out [V, n] = w[idx, d0:d0+n]
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "proto_ce_gather_slice", [&] {
      using w_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_gather_slice_acc", [&] {
        gather_slice<w_t, scalar_t>(W, id.data_ptr<int64_t>(), V, d0, n, out.data_ptr<scalar_t>());
      });
    });
  };

  at::Tensor grad_x = need_grad_x ? at::empty({B, D}, X.options()) : at::empty({0}, X.options());
  at::Tensor grad_w = at::empty({0}, W.options());
  at::Tensor prototype_buffer, dw_buffer, dz_buffer, z_buffer;
  if (in_grad_w) {  // the dW rows first: spread_rows moves them from there to their idx rows
    grad_w = at::empty(W.sizes(), X.options());
    const at::Tensor lent = grad_w.view({-1});
    dw_buffer = lent.narrow(0, 0, V * D).view({V, D});
    prototype_buffer = lent.narrow(0, V * D, V * D).view({V, D});
    dz_buffer = lent.narrow(0, 2 * V * D, Bb * V);
    if (!z_in_grad_x) z_buffer = lent.narrow(0, 2 * V * D + Bb * V, Bb * V);
  } else {
    // with several slices, each block's dW slice lands in the slice buffer once dx is done and is added
    // to the dense gradient right away; with one, dW is summed over the blocks by the matmul itself
    // (beta = 1) and written into the dense gradient after the blocks, once the block buffers are freed
    if (need_grad_w && !one_slice) grad_w = dense_grad_w();
    prototype_buffer = at::empty({V, Dc}, X.options());
    dw_buffer = need_grad_w && one_slice ? at::empty({V, D}, X.options()) : prototype_buffer;
    dz_buffer = at::empty({Bb, V}, X.options());
    if (!z_in_grad_x) z_buffer = at::empty({Bb, V}, X.options());
  }
  if (one_slice) gather_into(prototype_buffer, 0, D);
  at::Tensor row_loss = at::empty({B}, X.options());
  at::Tensor row_dscale = at::empty({B}, X.options());
  at::Tensor row_max = at::empty({B}, X.options());
  at::Tensor target_logit = at::empty({B}, X.options());

  auto prototypes = [&](int64_t d0, int64_t n) -> at::Tensor {  // w[idx, d0:d0+n] as [V, n]
    if (one_slice) return prototype_buffer;
    at::Tensor out = as_matrix(prototype_buffer, V, n);
    gather_into(out, d0, n);
    return out;
  };

  for (int64_t b0 = 0; b0 < B; b0 += Bb) {
    const int64_t nb = std::min(Bb, B - b0);
    const at::Tensor x_block = X.narrow(0, b0, nb);
    at::Tensor z = z_in_grad_x ? as_matrix(grad_x.narrow(0, b0, nb), nb, V) : as_matrix(z_buffer, nb, V);
    for (int64_t d0 = 0; d0 < D; d0 += Dc) {  // z = x w[idx]^T, unscaled; beta = 0 on the first slice
      const int64_t n = std::min(Dc, D - d0);
      at::addmm_out(z, z, x_block.narrow(1, d0, n), prototypes(d0, n).t(), d0 == 0 ? 0.0 : 1.0, 1.0);
    }
    at::Tensor e = as_matrix(dz_buffer, nb, V);  // s*z - max, then exp, then dZ
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
    for (int64_t d0 = 0; (need_grad_x || need_grad_w) && d0 < D; d0 += Dc) {
      const int64_t n = std::min(Dc, D - d0);
      if (need_grad_x) {
        at::Tensor grad_x_slice = grad_x.narrow(0, b0, nb).narrow(1, d0, n);
        at::mm_out(grad_x_slice, e, prototypes(d0, n));
      }
      if (need_grad_w && one_slice) {
        at::addmm_out(dw_buffer, dw_buffer, e.t(), x_block, b0 == 0 ? 0.0 : 1.0, 1.0);
      } else if (need_grad_w) {
        at::Tensor dw = as_matrix(dw_buffer, V, n);
        at::mm_out(dw, e.t(), x_block.narrow(1, d0, n));
        write_rows_into(grad_w, d0, dw, b0 > 0);
      }
    }
  }
  if (in_grad_w) {
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_spread_rows", [&] {
      spread_rows<scalar_t>(grad_w.data_ptr<scalar_t>(), D, id.data_ptr<int64_t>(), V);
    });
    zero_rows_outside_idx(grad_w);
  } else if (need_grad_w && one_slice) {  // the dense gradient is the largest tensor at the DINO shape
    prototype_buffer.reset();
    dz_buffer.reset();
    z_buffer.reset();
    grad_w = dense_grad_w();
    write_rows_into(grad_w, 0, dw_buffer, false);
  }
  const at::Tensor loss = row_loss.sum().mul_(row_weight);
  at::Tensor grad_scale = need_grad_scale ? row_dscale.sum().mul_(row_weight) : at::empty({0}, X.options());
  if (need_grad_w) grad_w = grad_w.to(W.scalar_type());  // no copy for float32 / float64 prototypes
  return {loss, grad_x, grad_w, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(proto_ce, CPU, m) {
  m.impl("label_positions", &label_positions_cpu);
  m.impl("xent_forward", &xent_forward_cpu);
  m.impl("xent_backward", &xent_backward_cpu);
  m.impl("xent_fused", &xent_fused_cpu);
}

}  // namespace proto_ce
