// Schemas of the proto_ce operators (torch.library) and the stub that makes the compiled library
// importable as the Python module `_proto_ce_ext` (importing it runs the registrations below).
//
// Kernels are registered per device in the other files of csrc/ (TORCH_LIBRARY_IMPL); xent_fused's
// autograd formula in proto_ce_autograd.cpp; the other autograd formulas and the fake (meta) kernels used
// by torch.compile are registered from proto_ce.py.
#include <Python.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

TORCH_LIBRARY(proto_ce, m) {
  // Positions of `labels` (class ids) inside `idx` (sorted unique class ids of the K classes).
  // Validates idx (1-d, strictly increasing, within [0, num_classes)) and that every label is in idx;
  // raises RuntimeError naming the problem otherwise (ValueError through proto_ce.py).
  m.def("label_positions(Tensor idx, Tensor labels, int num_classes) -> Tensor");

  // Hard-label cross-entropy over a subset of prototypes (Sec. 3.3 / 4.1 vocabulary subsampling):
  //   loss[b] = logsumexp_v(scale * x[b].w[idx[v]]) - scale * x[b].w[idx[target_pos[b]]]
  // Returns (loss[B], lse[B]) in the accumulation dtype (float64 for float64 inputs, else float32).
  // Its backward (xent_backward) recomputes the logits chunk by chunk from the saved log-sum-exp.
  m.def("xent_forward(Tensor x, Tensor w, Tensor idx, Tensor target_pos, Tensor scale) -> (Tensor, Tensor)");

  // The same loss reduced over the batch (mean if `mean`, else sum), together with its gradients for an
  // upstream gradient of 1, computed in the same pass over the logits: row blocks of x meet all V
  // prototypes at once, so each row's log-sum-exp is exact and its softmax can be turned into gradients
  // right away (no second matmul to recompute the logits). Returns (loss 0-d, grad_x [B,D], grad_w [K,D]
  // dense with rows outside idx exactly zero, grad_scale 0-d): grad_w in w's dtype, the others in the
  // accumulation dtype; the autograd formula multiplies them by the upstream gradient. A gradient that is
  // not needed comes back as an empty tensor [0].
  m.def(
      "xent_fused(Tensor x, Tensor w, Tensor idx, Tensor target_pos, Tensor scale, bool mean, bool need_grad_x, "
      "bool need_grad_w, bool need_grad_scale) -> (Tensor, Tensor, Tensor, Tensor)");

  // Gradients of sum_b grad_loss[b] * loss[b] for x [B,D], w [K,D] (rows outside idx exactly zero) and
  // the 0-d scale. A gradient that is not needed comes back as an empty tensor of shape [0].
  m.def(
      "xent_backward(Tensor grad_loss, Tensor x, Tensor w, Tensor idx, Tensor target_pos, Tensor scale, "
      "Tensor lse, bool need_grad_x, bool need_grad_w, bool need_grad_scale) -> (Tensor, Tensor, Tensor)");
}

// Under torch.autocast every op of the library runs as written, in the dtype of its inputs (the kernels
// accumulate fp16 / bf16 in float32 themselves). Custom ops have no autocast kernel of their own, so
// without this one an enclosing autocast region would stay active inside the kernels and turn their
// float32 matmuls into bf16 ones (a dtype error in the middle of a kernel).
void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

constexpr const char* kOps[] = {"label_positions", "xent_forward", "xent_fused", "xent_backward",
                                "dino_forward",    "dino_backward"};

void register_without_autocast(torch::Library& m) {
  for (const char* name : kOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
}

TORCH_LIBRARY_IMPL(proto_ce, AutocastCPU, m) { register_without_autocast(m); }
TORCH_LIBRARY_IMPL(proto_ce, AutocastCUDA, m) { register_without_autocast(m); }

// Build information that proto_ce.py reads from the file (without loading it) to decide whether a
// prebuilt library is current (built from the same csrc sources) and has CUDA kernels. setup.py and the
// JIT build pass -DPROTO_CE_SOURCES_HASH=<hex> (unquoted: build commands pass through a shell) and
// -DPROTO_CE_WITH_CUDA when the .cu files are compiled in.
#define PROTO_CE_STRINGIFY_(x) #x
#define PROTO_CE_STRINGIFY(x) PROTO_CE_STRINGIFY_(x)
#ifdef PROTO_CE_SOURCES_HASH
#define PROTO_CE_SOURCES_HASH_STR PROTO_CE_STRINGIFY(PROTO_CE_SOURCES_HASH)
#else
#define PROTO_CE_SOURCES_HASH_STR "unknown"
#endif
#ifdef PROTO_CE_WITH_CUDA
#define PROTO_CE_CUDA_FLAG "1"
#else
#define PROTO_CE_CUDA_FLAG "0"
#endif
extern "C" __attribute__((used, visibility("default"))) const char proto_ce_build_info[] =
    "PROTO_CE_BUILD_INFO[sources=" PROTO_CE_SOURCES_HASH_STR ";cuda=" PROTO_CE_CUDA_FLAG "]";

extern "C" PyObject* PyInit__proto_ce_ext(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_proto_ce_ext", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
