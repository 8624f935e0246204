// fastctx._C: every schema of the C++/CUDA kernels lives here, and the CPU
// implementations register themselves from csrc/cpu/*.cpp, linked into this
// module. The CUDA implementations are a separate module, fastctx._C_cuda
// (csrc/cuda/module.cpp and csrc/cuda/*.cu), so that the CPU kernels never
// depend on a CUDA build.
//
// These are raw kernels ("<op>_fwd" / "<op>_bwd"): no autograd, no fake kernel.
// The public, differentiable ops ("fastctx::<op>") are defined in
// fastctx/ops/*.py and call these from their implementation. One exception,
// window_attention_autograd, pairs two raw kernels in a C++ autograd node
// (csrc/autograd/) for the eager calls of one op whose Python layers cost
// as much as its smallest shapes' kernels. Shapes and the
// exact contract of every kernel are documented in docs/kernels.md.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastctx._C runs the static TORCH_LIBRARY initialisers below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastctx schemas and CPU kernels (see torch.ops.fastctx)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastctx, m) {
  // Adaptive average pooling of x [B, C, H, W] to every scale in one pass.
  // out [B, C, sum(s*s)]: scale i's s*s bins (row-major) at offset sum_{j<i} s_j^2.
  m.def("pyramid_pool_fwd(Tensor x, int[] scales) -> Tensor");
  m.def("pyramid_pool_bwd(Tensor grad, int[] scales, int height, int width) -> Tensor");
  // Z_g = sigmoid(X_g^T W_g^T + bias_g) P_g for every group g (one per pool scale).
  m.def(
      "gla_context_fwd(Tensor x, Tensor weight, Tensor bias, Tensor pooled, int[] group_sizes)"
      " -> Tensor");
  m.def(
      "gla_context_bwd(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor pooled,"
      " int[] group_sizes) -> (Tensor, Tensor, Tensor, Tensor)");
  // out = relu(relu(y * scale[c] + shift[c]) + residual): BN(affine) + ReLU + residual + ReLU.
  // With save_mask, also out > 0 as uint8 [B, C, ceil(H*W/8)] bits (LSB first) for the backward;
  // without, an empty mask.
  m.def(
      "residual_relu_fwd(Tensor y, Tensor residual, Tensor scale, Tensor shift, bool save_mask)"
      " -> (Tensor, Tensor)");
  m.def(
      "residual_relu_bwd(Tensor grad, Tensor y, Tensor mask, Tensor scale, Tensor shift)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // EncNet Encoding layer: E[b,k] = sum_i softmax_k(s_k ||x_i - c_k||^2) (x_i - c_k).
  // x is [B, D, N] when channels_first (an NCHW feature map, flattened) else [B, N, D].
  m.def("encoding_fwd(Tensor x, Tensor codewords, Tensor scale, bool channels_first) -> Tensor");
  m.def(
      "encoding_bwd(Tensor grad, Tensor x, Tensor codewords, Tensor scale, bool channels_first)"
      " -> (Tensor, Tensor, Tensor)");
  // Class centres [B, K, C] of feats [B, C, H, W] weighted by a softmax of scale * probs
  // [B, K, H, W], over the pixels ("ocr") or over the classes ("paper"); also the per-class
  // statistic the backward needs (log-sum-exp or mass). Contract: docs/kernels.md.
  m.def("class_gather_fwd(Tensor feats, Tensor probs, str mode, float scale) -> (Tensor, Tensor)");
  m.def(
      "class_gather_bwd(Tensor grad, Tensor feats, Tensor probs, Tensor centres, Tensor stat,"
      " str mode, float scale) -> (Tensor, Tensor)");
  // out [B, Cv, H, W] = sum_k softmax_k(scale * s) values_k per pixel, s = query . keys_k or the
  // logits; also the per-pixel log-sum-exp the backward recomputes the attention from.
  m.def(
      "class_attention_fwd(Tensor? query, Tensor? keys, Tensor values, Tensor? logits, float scale)"
      " -> (Tensor, Tensor)");
  m.def(
      "class_attention_bwd(Tensor grad, Tensor? query, Tensor? keys, Tensor values, Tensor? logits,"
      " Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // Multi-head attention inside (shifted) windows of qkv [B, H, W, 3C] -> [B, H, W, C]; padding,
  // shift and region mask by index arithmetic. Contract: docs/kernels.md.
  m.def(
      "window_attention_fwd(Tensor qkv, Tensor? bias_table, Tensor? pad_qkv, int heads, int[] window,"
      " int[] shift, float scale) -> Tensor");
  m.def(
      "window_attention_bwd(Tensor grad, Tensor qkv, Tensor? bias_table, Tensor? pad_qkv, int heads,"
      " int[] window, int[] shift, float scale) -> (Tensor, Tensor, Tensor)");
  // window_attention_fwd with window_attention_bwd as its derivative, in a C++ autograd node
  // (csrc/autograd/window_attention.cpp): the eager route of fastctx.ops.window_attention.
  m.def(
      "window_attention_autograd(Tensor qkv, Tensor? bias_table, Tensor? pad_qkv, int heads, int[] window,"
      " int[] shift, float scale) -> Tensor");
  // IIWA's window tokens: mean of each Wh x Ww window of x [B, Hp, Wp, C] (channels last), + pos
  // [Hg, Wg, C] if given -> [B, Hg, Wg, C]. Backward: grad_x = grad / (Wh*Ww) over each window;
  // grad_pos = sum over the batch when pos_grad, else an empty tensor.
  m.def("window_pool_fwd(Tensor x, Tensor? pos, int[] window) -> Tensor");
  m.def(
      "window_pool_bwd(Tensor grad, int[] window, bool pos_grad) -> (Tensor, Tensor)");
  // residual [B, H, W, C] + bilinear upsample (align_corners=True) of tokens [B, h, w, C].
  // Backward: grad_tokens [B, height, width, C], the transpose of the upsampling as a gather
  // (grad_residual is grad itself).
  m.def("upsample_add_fwd(Tensor tokens, Tensor residual) -> Tensor");
  m.def("upsample_add_bwd(Tensor grad, int height, int width) -> Tensor");
  // The same sum with the LayerNorm over C that follows it in IIWA (proj2's norm) and in ULLMC's
  // cross-scale layer (norm2): out = residual + up(tokens), normed = LN(out) * weight + bias, and the
  // per-pixel mean and rstd [B, H, W] (float32; float64 for float64 data) the backward reads.
  // Backward: grad_sum = grad_out + LN's input gradient of grad_normed (grad_residual itself; grad_tokens
  // is upsample_add_bwd of it); grad_weight, grad_bias [C] reduced in a fixed order when affine_grads,
  // else empty tensors.
  m.def(
      "upsample_add_layer_norm_fwd(Tensor tokens, Tensor residual, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "upsample_add_layer_norm_bwd(Tensor grad_out, Tensor grad_normed, Tensor out, Tensor mean, Tensor rstd,"
      " Tensor? weight, bool affine_grads) -> (Tensor, Tensor, Tensor)");
}
