// CPU kernels of the hard-label subsampled-prototype cross-entropy (see ops.cpp for the schemas).
//
// The V = idx.numel() prototype columns are processed in chunks of Vc columns: each chunk gathers its
// rows of w ([Vc, D]), computes its logits with one BLAS matmul ([B, Vc], sized to stay in cache), and
// folds them into an online log-sum-exp. [B, K] and [B, V] are never materialised. The backward pass
// recomputes each chunk's logits from the saved log-sum-exp and turns them into dlogits in place; dx
// and the chunk's rows of dw are one matmul each (no atomics, fixed order: deterministic for a fixed
// number of threads). Elementwise work uses ATen's vectorised, multi-threaded kernels on the chunk.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
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
    TORCH_CHECK_VALUE(id[i] >= 0 && id[i] < num_classes, "proto_ce: idx contains class id ", id[i],
                      " outside [0, ", num_classes, ") (w has ", num_classes, " rows)");
    if (i > 0) {
      TORCH_CHECK_VALUE(id[i] != id[i - 1], "proto_ce: idx contains duplicate class id ", id[i],
                        " (idx must be sorted and unique)");
      TORCH_CHECK_VALUE(id[i] > id[i - 1], "proto_ce: idx is not sorted (idx[", i - 1, "]=", id[i - 1],
                        " > idx[", i, "]=", id[i], "); use torch.sort or torch.unique");
    }
  }
  at::Tensor pos = at::empty_like(labels_c);
  const int64_t* lab = labels_c.data_ptr<int64_t>();
  int64_t* out = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < labels_c.numel(); ++b) {
    const int64_t* hit = std::lower_bound(id, id + V, lab[b]);
    TORCH_CHECK_VALUE(hit != id + V && *hit == lab[b], "proto_ce: labels contain class id ", lab[b],
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

// Budget of one row block's [rows, V] logits in xent_fused, and the fewest rows a block may have (the
// matmul accumulating the w gradient over row blocks needs some depth to run at BLAS speed).
constexpr int64_t kCpuRowBlockBytes = 2 * 1024 * 1024;
constexpr int64_t kCpuMinRows = 128;

// Loss (mean or sum over rows) and its gradients in one pass: every row block sees all V columns, so
// its log-sum-exp is exact and softmax - onehot is formed right away; dx for the block and the block's
// contribution to dw[idx] are one matmul each. Three matmuls in all, as many as eager's forward + backward.
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
  const bool any_grad = need_grad_x || need_grad_w || need_grad_scale;
  const at::Tensor w_idx = w.index_select(0, idx).to(acc);  // [V, D], as eager's w[idx]
  at::Tensor grad_x = need_grad_x ? at::empty({B, D}, X.options()) : at::empty({0}, X.options());
  at::Tensor grad_w_rows = need_grad_w ? at::zeros({V, D}, X.options()) : at::empty({0}, X.options());
  at::Tensor row_loss = at::empty({B}, X.options());
  at::Tensor row_dscale = at::zeros({B}, X.options());
  const int64_t Bb = chunk_rows(B, V * static_cast<int64_t>(c10::elementSize(acc)), kCpuRowBlockBytes, kCpuMinRows);
  for (int64_t b0 = 0; b0 < B; b0 += Bb) {
    const int64_t nb = std::min(Bb, B - b0);
    const at::Tensor x_block = X.narrow(0, b0, nb);
    const at::Tensor t_block = tpos.narrow(0, b0, nb);
    at::Tensor z = at::mm(x_block, w_idx.t());  // [nb, V], unscaled x.w
    at::Tensor logits = at::mul(z, s);
    const at::Tensor lse = at::logsumexp(logits, {1});
    at::Tensor target_logit = at::empty({nb}, X.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_pick_targets", [&] { pick_targets<scalar_t>(logits, t_block, 0, target_logit); });
    at::Tensor loss_block = row_loss.narrow(0, b0, nb);
    at::sub_out(loss_block, lse, target_logit);
    if (!any_grad) continue;
    at::Tensor dlogits = logits.sub_(lse.unsqueeze(1)).exp_();  // softmax, in place
    const at::Tensor ones = at::ones({nb}, X.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "proto_ce_subtract_targets", [&] { subtract_at_targets<scalar_t>(dlogits, t_block, 0, ones); });
    if (need_grad_scale) {  // sum_v (p - y) z for each row of the block
      at::Tensor dscale_block = row_dscale.narrow(0, b0, nb);
      at::sum_out(dscale_block, z.mul_(dlogits), {1});
    }
    const at::Tensor dz = dlogits.mul_(row_weight * s);  // d loss / d(x.w)
    if (need_grad_x) {
      at::Tensor grad_x_block = grad_x.narrow(0, b0, nb);
      at::mm_out(grad_x_block, dz, w_idx);
    }
    if (need_grad_w) grad_w_rows.addmm_(dz.t(), x_block);  // fixed order over row blocks
  }
  const at::Tensor loss = row_loss.sum().mul_(row_weight);
  at::Tensor grad_scale = need_grad_scale ? row_dscale.sum().mul_(row_weight) : at::empty({0}, X.options());
  return {loss, grad_x, grad_w_rows, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(proto_ce, CPU, m) {
  m.impl("label_positions", &label_positions_cpu);
  m.impl("xent_forward", &xent_forward_cpu);
  m.impl("xent_backward", &xent_backward_cpu);
  m.impl("xent_fused", &xent_fused_cpu);
}

}  // namespace proto_ce
