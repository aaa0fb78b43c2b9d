// Autograd for the C++ kernels, in C++: one differentiable op per fused op (hetrain_C::layer_norm, ...),
// whose forward calls the *_fwd kernel and whose backward node calls the *_bwd kernel, on any device the
// kernels are registered for.
//
// Why not the Python autograd.Function the other backends use: an eager call through it costs more than
// a small kernel. Its forward binds and saves in Python, and its backward runs on the autograd engine's
// device thread, which must take the GIL for it; on the H200's host a LayerNorm forward+backward spent
// two thirds of its 650 us there (benchmarks/RESULTS.md). Here forward and backward stay in C++, as
// torch's own ops do. The Python face (hetrain/ops/_op.py) calls these when the backend chosen for a call
// is this extension and a gradient is needed; graphs, tensor subclasses and torch.func still go through
// the torch.library custom ops, which carry the fake implementations.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace hetrain {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The profiler range the Python path opens around a backend call (hetrain/plugins.py), e.g.
// "hetrain::layer_norm.forward[cuda]", so a profile shows the same ranges whichever path ran. The names are
// literals (a range may keep a view of its name); when no profiler listens the range costs a flag check.
#define HETRAIN_RANGE(t, op, direction) \
  RECORD_USER_SCOPE((t).is_cuda() ? "hetrain::" op "." direction "[cuda]" : "hetrain::" op "." direction "[cpu]")

// The kernel op `name` (e.g. "hetrain_C::layer_norm_fwd"), dispatched on its inputs' device.
template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

at::Tensor defined_if(bool keep, const at::Tensor& t) { return keep ? t : at::Tensor(); }

// x as the (rows, features) matrix the row kernels take: the ops accept any leading shape, and flattening here,
// below autograd, records no view nodes (each costs a small call more than its kernel). The inputs are saved
// as given, not flattened, so an in-place change to one after forward is still caught by its version counter
// (a non-contiguous input is copied to rows again in backward rather than a copy kept alive in between).
at::Tensor as_rows(const at::Tensor& x) {
  if (x.dim() == 2) return x;
  TORCH_CHECK(x.dim() >= 1, "hetrain: expected a tensor with >= 1 dim (rows, features), got a scalar");
  const auto sizes = x.sizes();
  return x.reshape({c10::multiply_integers(sizes.begin(), sizes.end() - 1), sizes.back()});
}

// The gradients as they are; under create_graph=True, behind a node that raises when a second derivative
// reaches it, since the backward kernels have no derivative of their own. The saved tensors and the incoming
// gradient dy (what the gradients depend on) are linked to that node, so a second derivative with respect to
// any of them raises instead of silently being None.
variable_list first_order(variable_list grads, const variable_list& saved, const at::Tensor& dy, const char* op,
                          const char* reference) {
  if (!at::GradMode::is_enabled()) return grads;
  variable_list inputs;
  std::vector<size_t> given;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].defined()) {
      given.push_back(i);
      inputs.push_back(grads[i].detach().requires_grad_());
    }
  }
  for (const at::Tensor& s : saved)
    if (s.defined() && s.requires_grad()) inputs.push_back(s);
  if (dy.requires_grad()) inputs.push_back(dy);
  const std::string message = std::string("hetrain.ops.") + op +
                              ": double backward (a gradient of its gradient, create_graph=True) is not supported: "
                              "its backward kernels have no derivative. Use " + reference +
                              " where second derivatives are needed";
  auto error = std::make_shared<torch::autograd::DelayedError>(message, static_cast<int64_t>(inputs.size()));
  const variable_list guarded = (*error)(std::move(inputs));
  for (size_t k = 0; k < given.size(); ++k) grads[given[k]] = guarded[k];
  return grads;
}

}  // namespace

// A named namespace, so autograd nodes read "CppNode<hetrain::fused::LayerNorm>" in profiles and errors.
namespace fused {

struct LayerNorm : torch::autograd::Function<LayerNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto fwd = kernel<Tensor3(const at::Tensor&, const OptTensor&, const OptTensor&, double)>(
        "hetrain_C::layer_norm_fwd");
    HETRAIN_RANGE(x, "layer_norm", "forward");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, rstd] = fwd.call(as_rows(x), weight, bias, eps);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    return {y.view(x.sizes()), mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd =
        kernel<Tensor3(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                       bool)>("hetrain_C::layer_norm_bwd");
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(4);  // the output was not used: every gradient is zero
    HETRAIN_RANGE(dy, "layer_norm", "backward");
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    at::Tensor dx, dw, db;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dw, db) =
          bwd.call(as_rows(dy), as_rows(saved[0]), optional(saved[1]), saved[2], saved[3], has_bias);
      dx = dx.view(saved[0].sizes());
    }
    return first_order({dx, defined_if(saved[1].defined(), dw), defined_if(has_bias, db), at::Tensor()}, saved, dy,
                       "layer_norm", "hetrain.ops.layer_norm_ref (F.layer_norm)");
  }
};

struct RmsNorm : torch::autograd::Function<RmsNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight, double eps) {
    static const auto fwd =
        kernel<Tensor2(const at::Tensor&, const OptTensor&, double)>("hetrain_C::rms_norm_fwd");
    HETRAIN_RANGE(x, "rms_norm", "forward");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, rstd] = fwd.call(as_rows(x), weight, eps);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), rstd});
    ctx->mark_non_differentiable({rstd});
    ctx->set_materialize_grads(false);
    return {y.view(x.sizes()), rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd =
        kernel<Tensor2(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&)>(
            "hetrain_C::rms_norm_bwd");
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(3);
    HETRAIN_RANGE(dy, "rms_norm", "backward");
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor dx, dw;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dw) = bwd.call(as_rows(dy), as_rows(saved[0]), optional(saved[1]), saved[2]);
      dx = dx.view(saved[0].sizes());
    }
    return first_order({dx, defined_if(saved[1].defined(), dw), at::Tensor()}, saved, dy, "rms_norm",
                       "hetrain.ops.rms_norm_ref");
  }
};

struct BiasGelu : torch::autograd::Function<BiasGelu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias,
                            const std::string& approximate) {
    // std::string: the signature the CPU kernel is registered with (a typed handle must match it).
    static const auto fwd =
        kernel<at::Tensor(const at::Tensor&, const at::Tensor&, std::string)>("hetrain_C::bias_gelu_fwd");
    HETRAIN_RANGE(x, "bias_gelu", "forward");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor y = fwd.call(as_rows(x), bias, approximate);
    ctx->save_for_backward({x, bias});
    ctx->saved_data["approximate"] = approximate;
    ctx->set_materialize_grads(false);
    return y.view(x.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = kernel<Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::string)>(
        "hetrain_C::bias_gelu_bwd");
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(3);
    HETRAIN_RANGE(dy, "bias_gelu", "backward");
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor dx, db;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, db) =
          bwd.call(as_rows(dy), as_rows(saved[0]), saved[1], ctx->saved_data["approximate"].toStringRef());
      dx = dx.view(saved[0].sizes());
    }
    return first_order({dx, db, at::Tensor()}, saved, dy, "bias_gelu", "hetrain.ops.bias_gelu_ref");
  }
};

// Dropout is linear and self-adjoint: its backward is itself, with the same seed, so it is
// differentiable to any order and needs no first-order guard.
struct Dropout : torch::autograd::Function<Dropout> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& seed, double p) {
    static const auto fwd = kernel<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("hetrain_C::dropout_fwd");
    HETRAIN_RANGE(x, "dropout", "forward");
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor y = fwd.call(x, seed, p);
    ctx->save_for_backward({seed});
    ctx->saved_data["p"] = p;
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(3);
    HETRAIN_RANGE(dy, "dropout", "backward");
    const at::Tensor seed = ctx->get_saved_variables()[0];
    const double p = ctx->saved_data["p"].toDouble();
    if (at::GradMode::is_enabled()) {  // create_graph: the mask applied again, differentiably (a double backward)
      return {Dropout::apply(dy, seed, p), at::Tensor(), at::Tensor()};
    }
    // The kernel alone: through Dropout::apply a profile showed a second forward range inside the backward's.
    static const auto fwd = kernel<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("hetrain_C::dropout_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    return {fwd.call(dy, seed, p), at::Tensor(), at::Tensor()};
  }
};

struct DropoutAddLayerNorm : torch::autograd::Function<DropoutAddLayerNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               const OptTensor& weight, const OptTensor& bias, const at::Tensor& seed, double p,
                               double eps) {
    static const auto fwd =
        kernel<Tensor3(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                       double, double)>("hetrain_C::dropout_add_layer_norm_fwd");
    HETRAIN_RANGE(x, "dropout_add_layer_norm", "forward");
    TORCH_CHECK(residual.sizes() == x.sizes(), "hetrain.dropout_add_layer_norm: residual must have x's shape ",
                x.sizes(), ", got ", residual.sizes());
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, rstd] = fwd.call(as_rows(x), as_rows(residual), weight, bias, seed, p, eps);
    ctx->save_for_backward({x, residual, weight.value_or(at::Tensor()), mean, rstd, seed});
    ctx->saved_data["p"] = p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    return {y.view(x.sizes()), mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd =
        kernel<Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, double, bool)>("hetrain_C::dropout_add_layer_norm_bwd");
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(7);
    HETRAIN_RANGE(dy, "dropout_add_layer_norm", "backward");
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    at::Tensor dx, dres, dw, db;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dres, dw, db) = bwd.call(as_rows(dy), as_rows(saved[0]), as_rows(saved[1]), optional(saved[2]),
                                            saved[3], saved[4], saved[5], ctx->saved_data["p"].toDouble(), has_bias);
      dx = dx.view(saved[0].sizes());
      dres = dres.view(saved[0].sizes());
    }
    return first_order({dx, dres, defined_if(saved[2].defined(), dw), defined_if(has_bias, db), at::Tensor(),
                        at::Tensor(), at::Tensor()},
                       saved, dy, "dropout_add_layer_norm", "hetrain.ops.dropout_add_layer_norm_ref");
  }
};

// BatchNorm + ReLU + MaxPool after the statistics are known (bn_stats computes batch statistics and
// updates the running ones first). `batch_stats`: whether mean and invstd came from this batch, so the
// gradient flows through them into x.
struct BnReluPool : torch::autograd::Function<BnReluPool> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& mean,
                               const OptTensor& invstd, const OptTensor& weight, const OptTensor& bias,
                               bool batch_stats, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding) {
    static const auto fwd =
        kernel<Tensor2(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                       at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>("hetrain_C::bn_relu_pool_fwd");
    HETRAIN_RANGE(x, "bn_relu_pool", "forward");
    // Here, not only in the backward kernel: a forward that succeeded would fail in backward, far from the call.
    TORCH_CHECK(!batch_stats || mean.has_value(), "hetrain.bn_relu_pool: batch_stats needs mean and invstd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, argmax] = fwd.call(x, mean, invstd, weight, bias, kernel_size, stride, padding);
    ctx->save_for_backward({x, mean.value_or(at::Tensor()), invstd.value_or(at::Tensor()),
                            weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), argmax});
    ctx->saved_data["batch_stats"] = batch_stats;
    ctx->saved_data["kernel"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->mark_non_differentiable({argmax});
    ctx->set_materialize_grads(false);
    return {y, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd =
        kernel<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                       const OptTensor&, const OptTensor&, bool, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>(
            "hetrain_C::bn_relu_pool_bwd");
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return variable_list(9);
    HETRAIN_RANGE(dy, "bn_relu_pool", "backward");
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> kernel_size = ctx->saved_data["kernel"].toIntVector();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    at::Tensor dx, dw, db;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dw, db) = bwd.call(dy, saved[5], saved[0], optional(saved[1]), optional(saved[2]),
                                      optional(saved[3]), optional(saved[4]), ctx->saved_data["batch_stats"].toBool(),
                                      kernel_size, stride, padding);
    }
    return first_order({dx, at::Tensor(), at::Tensor(), defined_if(saved[3].defined(), dw),
                        defined_if(saved[4].defined(), db), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()},
                       saved, dy, "bn_relu_pool", "hetrain.ops.bn_relu_pool_ref (relu_pool_ref without BatchNorm)");
  }
};

Tensor3 layer_norm(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  const variable_list out = LayerNorm::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensor2 rms_norm(const at::Tensor& x, const OptTensor& weight, double eps) {
  const variable_list out = RmsNorm::apply(x, weight, eps);
  return {out[0], out[1]};
}

at::Tensor bias_gelu(const at::Tensor& x, const at::Tensor& bias, std::string approximate) {
  return BiasGelu::apply(x, bias, approximate);
}

at::Tensor dropout(const at::Tensor& x, const at::Tensor& seed, double p) { return Dropout::apply(x, seed, p); }

Tensor3 dropout_add_layer_norm(const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight,
                               const OptTensor& bias, const at::Tensor& seed, double p, double eps) {
  const variable_list out = DropoutAddLayerNorm::apply(x, residual, weight, bias, seed, p, eps);
  return {out[0], out[1], out[2]};
}

Tensor2 bn_relu_pool(const at::Tensor& x, const OptTensor& mean, const OptTensor& invstd, const OptTensor& weight,
                     const OptTensor& bias, bool batch_stats, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                     at::IntArrayRef padding) {
  const variable_list out =
      BnReluPool::apply(x, mean, invstd, weight, bias, batch_stats, kernel_size, stride, padding);
  return {out[0], out[1]};
}

void register_differentiable_ops(torch::Library& m) {
  m.impl("layer_norm", &layer_norm);
  m.impl("rms_norm", &rms_norm);
  m.impl("bias_gelu", &bias_gelu);
  m.impl("dropout", &dropout);
  m.impl("dropout_add_layer_norm", &dropout_add_layer_norm);
  m.impl("bn_relu_pool", &bn_relu_pool);
}

}  // namespace fused

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("bias_gelu(Tensor x, Tensor bias, str approximate) -> Tensor");
  m.def("dropout(Tensor x, Tensor seed, float p) -> Tensor");
  m.def(
      "dropout_add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, Tensor seed, float p,"
      " float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_relu_pool(Tensor x, Tensor? mean, Tensor? invstd, Tensor? weight, Tensor? bias, bool batch_stats,"
      " int[2] kernel, int[2] stride, int[2] padding) -> (Tensor, Tensor)");
}

// The Autograd keys run the Functions above; below autograd (inference mode) the same functions run,
// where Function::apply records nothing and calls the kernels.
TORCH_LIBRARY_IMPL(hetrain_C, Autograd, m) { fused::register_differentiable_ops(m); }

TORCH_LIBRARY_IMPL(hetrain_C, CompositeExplicitAutograd, m) { fused::register_differentiable_ops(m); }

}  // namespace hetrain
