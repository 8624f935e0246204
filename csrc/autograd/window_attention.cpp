// window_attention_autograd: the raw window_attention kernels behind a C++
// autograd node, for plain eager calls of fastctx.ops.window_attention on the
// cpu and cuda backends (the wrapper decides; fastctx/ops/window_attention.py).
//
// Why: Swin-T stage 4 is 2 x 7 x 7 tokens, and its whole forward + backward
// takes about 1.5 ms on one CPU core. The Python route to the same kernels
// (torch.autograd.Function, setup_context, the backward's dispatch) cost
// about 0.1 ms of that with cold caches. Here the node is C++; the kernels,
// their arguments and so every bit of the results are those of the custom op
// fastctx::window_attention.
//
// Double backward (create_graph=True): the node's backward calls the custom
// op fastctx::window_attention_backward instead of the raw kernel. That op is
// defined in Python and differentiable (its derivative is the reference
// maths), so the graph it records is the one the custom op's own backward
// records.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastctx {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;
using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

OptionalTensor optional_of(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

OptionalTensor contiguous_or_none(const OptionalTensor& t) {
  return t ? OptionalTensor(t->contiguous()) : std::nullopt;
}

// The ops' C++ signatures: the forward kernel; the backward kernel; the
// differentiable backward op, which also takes the backend to run on.
using Forward = at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, int64_t,
                           c10::IntArrayRef, c10::IntArrayRef, double);
using Backward = Gradients(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                           const OptionalTensor&, int64_t, c10::IntArrayRef, c10::IntArrayRef,
                           double);
using DifferentiableBackward =
    Gradients(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
              int64_t, c10::IntArrayRef, c10::IntArrayRef, double, c10::string_view);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const auto& forward_kernel() {
  static const auto op = find_op<Forward>("fastctx::window_attention_fwd");
  return op;
}

const auto& backward_kernel() {
  static const auto op = find_op<Backward>("fastctx::window_attention_bwd");
  return op;
}

// Defined in Python (fastctx/ops/window_attention.py) and registered when
// fastctx.ops is imported, after this library: looked up on first use.
const auto& differentiable_backward() {
  static const auto op = find_op<DifferentiableBackward>("fastctx::window_attention_backward");
  return op;
}

at::Tensor window_attention_forward(const at::Tensor& qkv, const OptionalTensor& bias_table,
                                    const OptionalTensor& pad_qkv, int64_t heads,
                                    c10::IntArrayRef window, c10::IntArrayRef shift,
                                    double scale) {
  return forward_kernel().call(qkv.contiguous(), contiguous_or_none(bias_table),
                               contiguous_or_none(pad_qkv), heads, window, shift, scale);
}

}  // namespace

// Outside the anonymous namespace: autograd names the node after this type
// (torch::autograd::CppNode<fastctx::WindowAttentionFunction>).
struct WindowAttentionFunction : public torch::autograd::Function<WindowAttentionFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv,
                            const OptionalTensor& bias_table, const OptionalTensor& pad_qkv,
                            int64_t heads, c10::IntArrayRef window, c10::IntArrayRef shift,
                            double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out =
        window_attention_forward(qkv, bias_table, pad_qkv, heads, window, shift, scale);
    // The inputs as given (the backward makes them contiguous again): a
    // contiguous copy saved here would hold memory until the backward.
    ctx->save_for_backward(
        {qkv, bias_table.value_or(at::Tensor()), pad_qkv.value_or(at::Tensor())});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["window"] = window;
    ctx->saved_data["shift"] = shift;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& qkv = saved[0];
    const OptionalTensor bias_table = optional_of(saved[1]), pad_qkv = optional_of(saved[2]);
    const int64_t heads = ctx->saved_data["heads"].toInt();
    const std::vector<int64_t> window = ctx->saved_data["window"].toIntVector();
    const std::vector<int64_t> shift = ctx->saved_data["shift"].toIntVector();
    const double scale = ctx->saved_data["scale"].toDouble();
    const at::Tensor grad = grads[0].contiguous();
    Gradients g;
    if (at::GradMode::is_enabled()) {
      // create_graph: the differentiable op, on the backend this node ran on.
      g = differentiable_backward().call(grad, qkv, bias_table, pad_qkv, heads, window, shift,
                                         scale, qkv.is_cuda() ? "cuda" : "cpu");
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      g = backward_kernel().call(grad, qkv.contiguous(), contiguous_or_none(bias_table),
                                 contiguous_or_none(pad_qkv), heads, window, shift, scale);
    }
    auto& [grad_qkv, grad_table, grad_pad] = g;
    // One entry per forward argument; the kernels return empty tensors for absent inputs.
    return {grad_qkv, bias_table ? grad_table : at::Tensor(), pad_qkv ? grad_pad : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

at::Tensor window_attention_autograd(const at::Tensor& qkv, const OptionalTensor& bias_table,
                                     const OptionalTensor& pad_qkv, int64_t heads,
                                     c10::IntArrayRef window, c10::IntArrayRef shift,
                                     double scale) {
  return WindowAttentionFunction::apply(qkv, bias_table, pad_qkv, heads, window, shift, scale);
}

}  // namespace
}  // namespace fastctx

// Autograd: the node above. Below autograd (inference mode, or a caller that
// already dispatched past it): the forward kernel alone, on any backend's
// tensors.
TORCH_LIBRARY_IMPL(fastctx, Autograd, m) {
  m.impl("window_attention_autograd", &fastctx::window_attention_autograd);
}

TORCH_LIBRARY_IMPL(fastctx, CompositeExplicitAutograd, m) {
  m.impl("window_attention_autograd", &fastctx::window_attention_forward);
}
