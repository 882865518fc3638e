// Autograd formula of xent_fused, for every device (Autograd dispatch key).
//
// xent_fused returns the loss together with its gradients for an upstream gradient of 1; the backward
// pass hands them over when the upstream gradient is exactly 1 (loss.backward() on a CPU) and scales them
// otherwise. It lives in C++, unlike the op family's other formulas
// (proto_ce.py), because it runs on every training step: registered from Python (torch.library's
// register_autograd) it added about 0.1 ms of Python to every step (fwd+bwd at B=4: 214 us, now 120 us;
// eager 114 us), which left the op 10-20 % behind eager at the SL shape on a CPU
// (benchmarks/results/cpu-2026-11-26). The fake kernels stay in proto_ce.py; torch.compile traces this
// formula like any other.
#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

namespace proto_ce {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_xent_fused(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx, const at::Tensor& target_pos,
    const at::Tensor& scale, bool mean, bool need_x, bool need_w, bool need_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("proto_ce::xent_fused", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, bool, bool, bool, bool)>();
  return op.call(x, w, idx, target_pos, scale, mean, need_x, need_w, need_scale);
}

// An ordinary CPU tensor holding exactly 1: the common loss.backward(). Reading it costs nothing on a
// CPU; on a GPU it would synchronise, and a traced (fake / functional) tensor has no value to read.
bool is_plain_cpu_one(const at::Tensor& t) {
  return t.is_cpu() && !at::isTensorSubclassLike(t) && t.numel() == 1 && t.item<double>() == 1.0;
}

class XentFused : public torch::autograd::Function<XentFused> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor& idx, const at::Tensor& target_pos, const at::Tensor& scale,
                               bool mean, bool need_x, bool need_w, bool need_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad_x, grad_w, grad_scale] =
        call_xent_fused(x, w, idx, target_pos, scale, mean, need_x, need_w, need_scale);
    ctx->mark_non_differentiable({grad_x, grad_w, grad_scale});
    // no zero-filled [B, D] / [K, D] upstream gradients for the outputs nobody differentiates
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_x, grad_w, grad_scale});
    ctx->saved_data["computed"] = std::vector<bool>{need_x, need_w, need_scale};
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(w.scalar_type());
    ctx->saved_data["scale_dtype"] = static_cast<int64_t>(scale.scalar_type());
    return {loss, grad_x, grad_w, grad_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_x = saved[0], &grad_w = saved[1], &grad_scale = saved[2];
    const auto computed = ctx->saved_data["computed"].toBoolList();
    TORCH_CHECK(!(ctx->needs_input_grad(0) && !computed[0]) && !(ctx->needs_input_grad(1) && !computed[1]) &&
                    !(ctx->needs_input_grad(4) && !computed[2]),
                "proto_ce: xent_fused was called without computing a gradient that autograd needs");
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const auto w_dtype = static_cast<at::ScalarType>(ctx->saved_data["w_dtype"].toInt());
    const auto scale_dtype = static_cast<at::ScalarType>(ctx->saved_data["scale_dtype"].toInt());
    // upstream gradient exactly 1: hand over the saved gradients, no copy (autograd then takes them over as
    // .grad without copying too, once this node has released them)
    const bool upstream_one = is_plain_cpu_one(grad_loss);
    if (ctx->needs_input_grad(0)) {
      out[0] = upstream_one && grad_x.scalar_type() == x_dtype ? grad_x : grad_x.mul(grad_loss).to(x_dtype);
    }
    if (ctx->needs_input_grad(1)) {
      out[1] = upstream_one && grad_w.scalar_type() == w_dtype ? grad_w : grad_w.mul(grad_loss).to(w_dtype);
    }
    if (ctx->needs_input_grad(4)) out[4] = grad_scale.mul(grad_loss).to(scale_dtype);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> xent_fused_autograd(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx, const at::Tensor& target_pos,
    const at::Tensor& scale, bool mean, bool need_x, bool need_w, bool need_scale) {
  auto out = XentFused::apply(x, w, idx, target_pos, scale, mean, need_x, need_w, need_scale);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(proto_ce, Autograd, m) {
  m.impl("xent_fused", &xent_fused_autograd);
}

}  // namespace proto_ce
