// Shared helpers of the proto_ce kernels (CPU and CUDA).
//
// The op family lives in the torch.library namespace `proto_ce`; schemas are in ops.cpp, the CPU kernels
// in *_cpu.cpp, the CUDA kernels in *_cuda.cu. A new op adds its schema to ops.cpp and its kernels in new
// files with their own TORCH_LIBRARY_IMPL(proto_ce, CPU/CUDA, m) blocks; setup.py and proto_ce.py build
// every csrc/*.cpp (and csrc/*.cu where CUDA is compiled).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace proto_ce {

// Error messages with numbers, dtypes or devices in them are assembled here, never by TORCH_CHECK's own
// formatting (a std::ostringstream): on the GPU machine's torch 2.11 (H100, 2026-11-26) writing an integer
// into a std::ostream from this extension crashed the process (segmentation fault in
// basic_ostream::_M_insert<long>, seen with cuda-gdb), while a TORCH_CHECK whose message is one string raised
// normally. std::to_string, snprintf and Device::str() use no stream.
template <typename T>
std::string message_part(const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? "true" : "false";
  } else if constexpr (std::is_integral_v<T>) {
    return std::to_string(value);
  } else if constexpr (std::is_floating_point_v<T>) {
    char text[32];
    std::snprintf(text, sizeof(text), "%g", static_cast<double>(value));
    return text;
  } else if constexpr (std::is_same_v<T, c10::Device>) {
    return value.str();
  } else if constexpr (std::is_same_v<T, at::ScalarType>) {
    return c10::toString(value);
  } else {
    return std::string(value);  // string literals and std::string
  }
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  return (std::string() + ... + message_part(parts));
}

}  // namespace proto_ce

// The argument checks below are kept out of line (not inlined into the kernels), so that a test can find
// them in the built library and confirm that they call no stream (tests/test_proto_ce.py).
#define PROTO_CE_CHECKER inline __attribute__((noinline))

// TORCH_CHECK with a message of several parts (see message_part), built only on failure. It reaches
// TORCH_CHECK as one C string, which c10 passes on as it is (a std::string temporary, seen by c10::str as a
// const std::string&, misses its pass-through and is copied through a stream); the temporary lives until
// the error has copied it.
#define PROTO_CE_CHECK(cond, ...) TORCH_CHECK(cond, ::proto_ce::message(__VA_ARGS__).c_str())

namespace proto_ce {

// How many of `total` items (columns, dimensions) one chunk holds: `bytes_per_item` of working memory each,
// sized to `budget_bytes`, rounded down to a multiple of `align` when larger. The environment variable
// `override_env`=<n> forces n (the tests use tiny chunks to exercise the chunk boundaries).
inline int64_t chunk_items(const char* override_env, int64_t total, int64_t bytes_per_item, int64_t budget_bytes,
                           int64_t align) {
  if (const char* env = std::getenv(override_env)) {
    const long long forced = std::atoll(env);
    if (forced > 0) return std::min<int64_t>(total, forced);
  }
  int64_t items = budget_bytes / std::max<int64_t>(bytes_per_item, 1);
  if (items >= 2 * align) items -= items % align;
  return std::max<int64_t>(1, std::min<int64_t>(total, items));
}

// Prototype columns per chunk of V (PROTO_CE_CHUNK_COLS overrides).
inline int64_t chunk_cols(int64_t V, int64_t bytes_per_col, int64_t budget_bytes, int64_t align) {
  return chunk_items("PROTO_CE_CHUNK_COLS", V, bytes_per_col, budget_bytes, align);
}

// Embedding dimensions per slice of the gathered prototypes w[idx] [V, D] in the CPU xent_fused
// (PROTO_CE_SLICE_DIMS overrides).
inline int64_t slice_dims(int64_t D, int64_t bytes_per_dim, int64_t budget_bytes, int64_t align) {
  return chunk_items("PROTO_CE_SLICE_DIMS", D, bytes_per_dim, budget_bytes, align);
}

// How many rows of x one row block holds when a block meets all V columns at once (xent_fused): the
// [rows, V] logits are sized to `budget_bytes`, but at least `min_rows` rows so that the matmuls that
// accumulate over rows stay efficient. PROTO_CE_CHUNK_ROWS=<n> overrides it (tests).
inline int64_t chunk_rows(int64_t B, int64_t bytes_per_row, int64_t budget_bytes, int64_t min_rows) {
  if (const char* env = std::getenv("PROTO_CE_CHUNK_ROWS")) {
    const long long forced = std::atoll(env);
    if (forced > 0) return std::min<int64_t>(B, forced);
  }
  const int64_t rows = std::max<int64_t>(min_rows, budget_bytes / std::max<int64_t>(bytes_per_row, 1));
  return std::max<int64_t>(1, std::min<int64_t>(B, rows));
}

// Accumulation dtype: float64 for float64 inputs, float32 for everything else (fp32/fp16/bf16).
// The per-sample loss and the saved log-sum-exp are returned in it.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The values of a sorted id list on the host (a CPU int64 tensor): every id within [0, K), no duplicates,
// increasing. The first offending entry raises, in the words of proto_ce.py's own checks; `kind` names an
// id ("class", "prototype") and `rows_owner` what has the K rows ("w has", "the prototypes have"). The
// CUDA kernels call it on a host copy of idx once their device-side check has found a problem.
PROTO_CE_CHECKER void check_sorted_unique_ids(const at::Tensor& host_ids, int64_t K, const char* kind,
                                              const char* rows_owner) {
  const at::Tensor ids = host_ids.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    PROTO_CE_CHECK(id[i] >= 0 && id[i] < K, "proto_ce: idx contains ", kind, " id ", id[i], " outside [0, ", K, ") (",
                   rows_owner, " ", K, " rows)");
    if (i > 0) {
      PROTO_CE_CHECK(id[i] != id[i - 1], "proto_ce: idx contains duplicate ", kind, " id ", id[i],
                     " (idx must be sorted and unique)");
      PROTO_CE_CHECK(id[i] > id[i - 1], "proto_ce: idx is not sorted (idx[", i - 1, "]=", id[i - 1], " > idx[", i,
                     "]=", id[i], "); use torch.sort or torch.unique");
    }
  }
}

// Raises the error of a label that is not among the sampled classes (labels[b] == label).
PROTO_CE_CHECKER void fail_label_not_in_idx(int64_t label, int64_t b) {
  PROTO_CE_CHECK(false, "proto_ce: labels contain class id ", label, " (labels[", b,
                 "]) which is not in idx; every label must be a sampled class");
}

// The dense [K, D] gradient of the prototypes w (in w's dtype): zero, except row idx[v] = rows[v] for the
// V sampled rows. idx is unique, so every row is written once (index_copy_ stays deterministic).
inline at::Tensor dense_prototype_grad(const at::Tensor& rows, const at::Tensor& idx, const at::Tensor& w) {
  at::Tensor out = at::zeros(w.sizes(), w.options());
  out.index_copy_(0, idx, rows.to(w.scalar_type()));
  return out;
}

// Argument checks of the kernels. proto_ce.py validates user input first with friendlier messages; these
// guard direct torch.ops.proto_ce calls. They raise RuntimeError (TORCH_CHECK), which proto_ce.py's public
// functions turn into ValueError.
PROTO_CE_CHECKER void check_label_args(const at::Tensor& idx, const at::Tensor& labels) {
  PROTO_CE_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong,
                 "proto_ce: idx must be a 1-d int64 tensor, got ", idx.dim(), "-d ", idx.scalar_type());
  PROTO_CE_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong,
                 "proto_ce: labels must be a 1-d int64 tensor, got ", labels.dim(), "-d ", labels.scalar_type());
  TORCH_CHECK(idx.numel() > 0, "proto_ce: idx is empty (V == 0); sample at least one prototype");
  PROTO_CE_CHECK(idx.device() == labels.device(), "proto_ce: idx is on ", idx.device(), " but labels on ",
                 labels.device());
}

PROTO_CE_CHECKER void check_kernel_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx,
                                        const at::Tensor& target_pos, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "proto_ce: x [B, D] and w [K, D] must be 2-d with the same D");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "proto_ce: x and w must have the same dtype");
  // (else the kernels' dtype dispatch would raise, formatting its message through a stream)
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "proto_ce: x and w must be float16/bfloat16/float32/float64");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.numel() > 0,
              "proto_ce: idx must be a non-empty 1-d int64 tensor");
  TORCH_CHECK(target_pos.dim() == 1 && target_pos.scalar_type() == at::kLong &&
                  target_pos.numel() == x.size(0) && x.size(0) > 0,
              "proto_ce: target_pos must be a 1-d int64 tensor with one entry per row of x (B > 0)");
  TORCH_CHECK(scale.dim() == 0, "proto_ce: scale must be a 0-d tensor");
  for (const at::Tensor* t : {&w, &idx, &target_pos, &scale}) {
    PROTO_CE_CHECK(t->device() == x.device(), "proto_ce: all inputs must be on one device (x is on ",
                   x.device(), ", another input on ", t->device(), ")");
  }
}

// xent_backward's per-row inputs: one upstream gradient and one saved log-sum-exp per row of x.
PROTO_CE_CHECKER void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& lse,
                                          const at::Tensor& x) {
  for (const at::Tensor* t : {&grad_loss, &lse}) {
    PROTO_CE_CHECK(t->dim() == 1 && t->numel() == x.size(0) && t->device() == x.device(),
                   "proto_ce: grad_loss and lse must be 1-d with one entry per row of x (B = ", x.size(0),
                   "), on x's device");
  }
}

}  // namespace proto_ce
