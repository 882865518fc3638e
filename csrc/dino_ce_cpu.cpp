// DINO self-distillation loss over a per-iteration subset of prototypes (Sec. 4.2 prototype subsampling):
// the op schemas (proto_ce::dino_forward / dino_backward), the device-independent pieces shared with
// dino_ce_cuda.cu, and the CPU kernels.
//
// Notation (crop-major rows, the order DINO's multi-crop batch has):
//   S  [n_crops*B, D]   student embeddings of every crop; row c*B+b is crop c of image b
//   T  [n_global*B, D]  teacher embeddings of the global crops; row g*B+b is global crop g of image b
//   Ws, Wt [K, D]       student / teacher prototypes; only the V rows idx take part
//   s_rj = S_r . Ws[idx_j],  t_gj = T_g . Wt[idx_j],  p_g = softmax_j((t_gj - centre[idx_j]) / tau_t)
//   student crop c pairs with every teacher global crop g != c of the same image: the set G(r), of size
//   n_g(c) = n_global - [c < n_global]; n_pairs = sum_c n_g(c) (DINO's n_loss_terms).
//   loss = 1/(n_pairs*B) sum_r sum_{g in G(r)} CE(p_g, log_softmax(s_r / tau_s))
//        = 1/(n_pairs*B) sum_r [ n_g(c) lse_r - S_r . M_r / tau_s ]
//   where lse_r = logsumexp_j(s_rj / tau_s), U_g = sum_j p_gj Ws[idx_j] (a D-vector) and
//   M_r = sum_{g in G(r)} U_g, because sum_j p_gj s_rj = S_r . U_g and each p_g sums to one.
// So the forward needs one online log-sum-exp per student row and, per teacher row, the probability-
// weighted sum of student prototypes U_g, accumulated with the same online rescaling (flash-attention
// style: when a row's running max grows, its U row is multiplied by exp(old max - new max)).
// Backward, with k = grad / (n_pairs*B*tau_s), P_s = softmax(s / tau_s), A_g = sum of the student rows
// paired with teacher row g:
//   dS_r          = k ( n_g(c) sum_j P_s_rj Ws[idx_j] - M_r )
//   dWs[idx_j]    = k ( sum_r n_g(c) P_s_rj S_r - sum_g p_gj A_g )     (rows of Ws outside idx: zero)
// The teacher, its prototypes and the centre get no gradient (DINO stops it). The teacher's raw logits
// summed over its rows, per idx column, come out for the centre update (DINO's centre is an EMA of their
// batch mean).
//
// CPU kernels: V is processed in chunks of Vc columns: gather the chunk's prototype rows, one BLAS matmul
// per logit block ([rows, Vc], sized to stay in cache), ATen's vectorised elementwise ops in place on the
// block for the softmax arithmetic. [rows, K] and [rows, V] are never materialised. No atomics, fixed
// reduction orders: deterministic for a fixed number of threads. (The CUDA kernels, dino_ce_cuda.cu, follow
// the same plan with custom row kernels.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "proto_ce.h"

TORCH_LIBRARY_FRAGMENT(proto_ce, m) {
  // DINO loss over the prototype subset idx, its teacher column sums, and what the backward needs:
  // (loss 0-d, teacher_logit_colsum [V], lse_student [n_crops*B], lse_teacher [n_global*B],
  //  u [n_global*B, D] = teacher-probability-weighted sums of student prototypes), all in the
  // accumulation dtype (float64 for float64 inputs, else float32).
  m.def(
      "dino_forward(Tensor student, Tensor teacher, Tensor w_student, Tensor w_teacher, Tensor idx, "
      "Tensor center, float tau_s, float tau_t, int n_global) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of grad_loss * loss for the student embeddings and w_student (rows outside idx exactly
  // zero). A gradient that is not needed comes back as an empty tensor of shape [0].
  m.def(
      "dino_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor w_student, Tensor w_teacher, "
      "Tensor idx, Tensor center, Tensor lse_student, Tensor lse_teacher, Tensor u, float tau_s, float tau_t, "
      "int n_global, bool need_grad_student, bool need_grad_w) -> (Tensor, Tensor)");
}

namespace proto_ce {
namespace dino {

// ---- device-independent pieces (ATen only), also used by dino_ce_cuda.cu -------------------------------

// Teacher global views paired with student crop c: all of them except the crop itself.
int64_t partners(int64_t crop, int64_t n_global) { return crop < n_global ? n_global - 1 : n_global; }

int64_t num_pairs(int64_t n_crops, int64_t n_global) {
  int64_t pairs = 0;
  for (int64_t c = 0; c < n_crops; ++c) pairs += partners(c, n_global);
  return pairs;
}

// idx must be 1-d int64, non-empty, within [0, K), sorted and unique. Checked here rather than in Python so
// that the op stays traceable by torch.compile (no data-dependent Python branches). On a GPU one small
// device-to-host copy decides whether the detailed scan (which names the offending entry) is needed.
void check_idx(const at::Tensor& idx, int64_t K) {
  PROTO_CE_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong,
                 "proto_ce: idx must be a 1-d int64 tensor, got ", idx.dim(), "-d ", idx.scalar_type());
  const int64_t V = idx.numel();
  TORCH_CHECK(V > 0, "proto_ce: idx is empty (V == 0); sample at least one prototype");
  at::Tensor host = idx;
  if (!idx.is_cpu()) {
    at::Tensor ok = at::logical_and(idx.min() >= 0, idx.max() < K);
    if (V > 1) ok = at::logical_and(ok, (idx.narrow(0, 1, V - 1) > idx.narrow(0, 0, V - 1)).all());
    if (ok.item<bool>()) return;
    host = idx.cpu();
  }
  check_sorted_unique_ids(host, K, "prototype", "the prototypes have");
}

// Guards for direct torch.ops calls; proto_ce.py checks shapes, dtypes and devices with friendlier messages
// first. The values of idx are checked here only (check_values: the forward; the backward gets the same idx).
void check_args(const at::Tensor& S, const at::Tensor& T, const at::Tensor& Ws, const at::Tensor& Wt,
                const at::Tensor& idx, const at::Tensor& center, double tau_s, double tau_t, int64_t n_global,
                bool check_values) {
  TORCH_CHECK(S.dim() == 2 && T.dim() == 2 && Ws.dim() == 2 && Ws.sizes() == Wt.sizes() &&
                  S.size(1) == Ws.size(1) && T.size(1) == Ws.size(1),
              "proto_ce.dino: student [n_crops*B, D], teacher [n_global*B, D], w_student and w_teacher "
              "[K, D] must be 2-d with one D and one K");
  TORCH_CHECK(S.scalar_type() == T.scalar_type() && S.scalar_type() == Ws.scalar_type() &&
                  S.scalar_type() == Wt.scalar_type() && S.scalar_type() == center.scalar_type(),
              "proto_ce.dino: student, teacher, prototypes and center must share one dtype");
  TORCH_CHECK(at::isFloatingType(S.scalar_type()),
              "proto_ce.dino: student, teacher, prototypes and center must be float16/bfloat16/float32/float64");
  TORCH_CHECK(center.dim() == 1 && center.size(0) == Ws.size(0), "proto_ce.dino: center must be [K]");
  TORCH_CHECK(n_global >= 1 && T.size(0) > 0 && T.size(0) % n_global == 0,
              "proto_ce.dino: teacher rows must be n_global*B with B > 0");
  const int64_t B = T.size(0) / n_global;
  TORCH_CHECK(S.size(0) % B == 0 && S.size(0) / B >= n_global && num_pairs(S.size(0) / B, n_global) > 0,
              "proto_ce.dino: student rows must be n_crops*B with n_crops >= n_global and at least one pair");
  TORCH_CHECK(tau_s > 0 && tau_t > 0, "proto_ce.dino: temperatures must be positive");
  if (check_values) {
    check_idx(idx, Ws.size(0));
  } else {
    TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.numel() > 0,
                "proto_ce.dino: idx must be a non-empty 1-d int64 tensor");
  }
}

// M_r = sum_{g in G(r)} U_g = (sum over the image's global views) - (the crop's own view, if global).
at::Tensor paired_teacher_sum(const at::Tensor& U, int64_t B, int64_t n_crops, int64_t n_global) {
  const at::Tensor views = U.view({n_global, B, U.size(1)});
  at::Tensor total = views[0].clone();
  for (int64_t g = 1; g < n_global; ++g) total += views[g];  // fixed order
  std::vector<at::Tensor> parts;
  for (int64_t c = 0; c < n_crops; ++c) parts.push_back(c < n_global ? total - views[c] : total);
  return at::cat(parts, 0);  // [n_crops*B, D]
}

// A_g = sum of the student rows paired with teacher row g = (all crops of the image) - (crop g itself).
at::Tensor paired_student_sum(const at::Tensor& S, int64_t B, int64_t n_crops, int64_t n_global) {
  const at::Tensor views = S.view({n_crops, B, S.size(1)});
  at::Tensor total = views[0].clone();
  for (int64_t c = 1; c < n_crops; ++c) total += views[c];  // fixed order
  std::vector<at::Tensor> parts;
  for (int64_t g = 0; g < n_global; ++g) parts.push_back(total - views[g]);
  return at::cat(parts, 0);  // [n_global*B, D]
}

// n_g(c) of every student row, as a [n_crops*B, 1] column in the given dtype/device.
at::Tensor partner_counts(int64_t B, int64_t n_crops, int64_t n_global, const at::TensorOptions& options) {
  std::vector<double> counts(n_crops * B);
  for (int64_t c = 0; c < n_crops; ++c)
    for (int64_t b = 0; b < B; ++b) counts[c * B + b] = static_cast<double>(partners(c, n_global));
  return at::tensor(counts, at::TensorOptions().dtype(at::kDouble)).to(options).unsqueeze(1);
}

// loss = 1/(n_pairs*B) sum_r [n_g(c) lse_r - S_r . M_r / tau_s], as a 0-d tensor on S's device.
// The row sum is a single reduction over a 1-d tensor (at::sum: fixed order for a fixed thread count).
at::Tensor assemble_loss(const at::Tensor& S, const at::Tensor& lse_s, const at::Tensor& U, double tau_s,
                         int64_t B, int64_t n_crops, int64_t n_global) {
  const at::Tensor M = paired_teacher_sum(U, B, n_crops, n_global);
  const at::Tensor per_row = partner_counts(B, n_crops, n_global, lse_s.options()).squeeze(1) * lse_s -
                             (S * M).sum(1) * (1.0 / tau_s);
  return per_row.sum() / static_cast<double>(num_pairs(n_crops, n_global) * B);
}

}  // namespace dino

namespace {

using namespace dino;

// Working-set budget of the [rows, Vc] logit chunks (student and teacher together).
constexpr int64_t kCpuChunkBytes = 1024 * 1024;

// Fold a chunk of scaled logits z [rows, n] (overwritten with exp(z - new max)) into each row's running
// (max, sum of exp); returns exp(old max - new max), the factor a running sum over the row must be scaled by.
at::Tensor online_softmax_update(at::Tensor& z, at::Tensor& run_max, at::Tensor& run_sum) {
  const at::Tensor new_max = at::maximum(run_max, std::get<0>(z.max(1)));
  const at::Tensor rescale = (run_max - new_max).exp_();  // exp(-inf) = 0 on the first chunk
  z.sub_(new_max.unsqueeze(1)).exp_();                    // ATen's vectorised exp
  run_sum.mul_(rescale).add_(z.sum(1));
  run_max.copy_(new_max);
  return rescale;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dino_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student, const at::Tensor& w_teacher,
    const at::Tensor& idx, const at::Tensor& center, double tau_s, double tau_t, int64_t n_global) {
  check_args(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global, true);
  const auto acc = acc_dtype(student.scalar_type());
  const at::Tensor S = student.contiguous().to(acc), T = teacher.contiguous().to(acc);  // no copy for fp32/64
  const int64_t rows_s = S.size(0), rows_t = T.size(0), D = S.size(1), V = idx.numel();
  const int64_t B = rows_t / n_global, n_crops = rows_s / B;
  const auto opts = S.options();
  const int64_t Vc = chunk_cols(V, (rows_s + rows_t) * static_cast<int64_t>(c10::elementSize(acc)), kCpuChunkBytes, 16);

  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor max_s = at::full({rows_s}, -inf, opts), sum_s = at::zeros({rows_s}, opts);
  at::Tensor max_t = at::full({rows_t}, -inf, opts), sum_t = at::zeros({rows_t}, opts);
  at::Tensor U = at::zeros({rows_t, D}, opts);
  at::Tensor colsum = at::empty({V}, opts);
  for (int64_t c0 = 0; c0 < V; c0 += Vc) {
    const int64_t n = std::min(Vc, V - c0);
    const at::Tensor idx_chunk = idx.narrow(0, c0, n);
    const at::Tensor ws_chunk = w_student.index_select(0, idx_chunk).to(acc);  // [n, D]
    const at::Tensor wt_chunk = w_teacher.index_select(0, idx_chunk).to(acc);
    const at::Tensor c_chunk = center.index_select(0, idx_chunk).to(acc);
    at::Tensor logits_s = at::mm(S, ws_chunk.t());  // [rows_s, n]
    at::Tensor logits_t = at::mm(T, wt_chunk.t());  // [rows_t, n]
    colsum.narrow(0, c0, n).copy_(logits_t.sum(0));  // raw teacher logits, for the centre
    logits_s.mul_(1.0 / tau_s);
    online_softmax_update(logits_s, max_s, sum_s);
    logits_t.sub_(c_chunk).mul_(1.0 / tau_t);
    const at::Tensor rescale = online_softmax_update(logits_t, max_t, sum_t);
    U.mul_(rescale.unsqueeze(1)).addmm_(logits_t, ws_chunk);  // U_g += sum_j exp(z_gj - max_g) Ws[idx_j]
  }
  U.div_(sum_t.unsqueeze(1));  // now U_g = sum_j p_gj Ws[idx_j]
  const at::Tensor lse_s = max_s + sum_s.log();
  const at::Tensor lse_t = max_t + sum_t.log();
  const at::Tensor loss = assemble_loss(S, lse_s, U, tau_s, B, n_crops, n_global);
  return {loss, colsum, lse_s, lse_t, U};
}

std::tuple<at::Tensor, at::Tensor> dino_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student,
    const at::Tensor& w_teacher, const at::Tensor& idx, const at::Tensor& center, const at::Tensor& lse_student,
    const at::Tensor& lse_teacher, const at::Tensor& u, double tau_s, double tau_t, int64_t n_global,
    bool need_grad_student, bool need_grad_w) {
  check_args(student, teacher, w_student, w_teacher, idx, center, tau_s, tau_t, n_global, false);
  const auto acc = acc_dtype(student.scalar_type());
  const int64_t rows_s = student.size(0), rows_t = teacher.size(0), D = student.size(1), V = idx.numel();
  const int64_t B = rows_t / n_global, n_crops = rows_s / B;
  at::Tensor grad_s = at::empty({0}, student.options());
  at::Tensor grad_w = at::empty({0}, w_student.options());
  if (!need_grad_student && !need_grad_w) return {grad_s, grad_w};

  const at::Tensor S = student.contiguous().to(acc), T = teacher.contiguous().to(acc);
  const auto opts = S.options();
  const at::Tensor k = grad_loss.to(acc) / (static_cast<double>(num_pairs(n_crops, n_global) * B) * tau_s);
  const at::Tensor lse_s = lse_student.to(acc).contiguous(), lse_t = lse_teacher.to(acc).contiguous();
  const at::Tensor counts = partner_counts(B, n_crops, n_global, opts);  // [rows_s, 1]
  at::Tensor S_weighted, A, grad_w_idx, Q;
  if (need_grad_w) {
    S_weighted = S * counts;                              // n_g(c) S_r
    A = paired_student_sum(S, B, n_crops, n_global);      // [rows_t, D]
    grad_w_idx = at::empty({V, D}, opts);
  }
  if (need_grad_student) Q = at::zeros({rows_s, D}, opts);  // sum_j P_s_rj Ws[idx_j]
  const int64_t Vc = chunk_cols(V, (rows_s + rows_t) * static_cast<int64_t>(c10::elementSize(acc)), kCpuChunkBytes, 16);

  for (int64_t c0 = 0; c0 < V; c0 += Vc) {
    const int64_t n = std::min(Vc, V - c0);
    const at::Tensor idx_chunk = idx.narrow(0, c0, n);
    const at::Tensor ws_chunk = w_student.index_select(0, idx_chunk).to(acc);
    // student probabilities, recomputed from the saved log-sum-exp
    const at::Tensor p_s = at::mm(S, ws_chunk.t()).mul_(1.0 / tau_s).sub_(lse_s.unsqueeze(1)).exp_();
    if (need_grad_student) Q.addmm_(p_s, ws_chunk);
    if (need_grad_w) {
      const at::Tensor wt_chunk = w_teacher.index_select(0, idx_chunk).to(acc);
      const at::Tensor c_chunk = center.index_select(0, idx_chunk).to(acc);
      const at::Tensor p_t =  // teacher probabilities
          at::mm(T, wt_chunk.t()).sub_(c_chunk).mul_(1.0 / tau_t).sub_(lse_t.unsqueeze(1)).exp_();
      at::Tensor gw = grad_w_idx.narrow(0, c0, n);
      at::mm_out(gw, p_s.t(), S_weighted);
      gw.addmm_(p_t.t(), A, 1, -1);
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

TORCH_LIBRARY_IMPL(proto_ce, CPU, m) {
  m.impl("dino_forward", &dino_forward_cpu);
  m.impl("dino_backward", &dino_backward_cpu);
}

}  // namespace proto_ce
