// The schemas of bertfast's native ops (namespace bertfast::). Their CPU kernels register themselves in
// their own files (TORCH_LIBRARY_IMPL(bertfast, CPU, m)); the gradients of the differentiable ones are in
// autograd.cpp; the fake (shape-only) implementations that torch.compile traces are in bertfast/ops/native.py.
// Every op computes in float32 and takes float32 or bfloat16 activations.
#include <torch/library.h>

TORCH_LIBRARY(bertfast, m) {
  // gelu(x + bias), exact erf GELU, over the last dimension of x (bias None: gelu(x)).
  m.def("bias_gelu(Tensor x, Tensor? bias) -> Tensor");
  // (dx, dbias) of bias_gelu for the gradient dy (dbias is float32 when bias is None).
  m.def("bias_gelu_backward(Tensor dy, Tensor x, Tensor? bias) -> (Tensor, Tensor)");
  // Dropout with the counter-hash mask (see dropout.cpp): row i of x.reshape(-1, cols) is rows[i] (default i),
  // seed a 0-dim int64 tensor. Its gradient is the same op on dy.
  m.def("dropout(Tensor x, Tensor seed, float p, Tensor? rows) -> Tensor");
  // The 32-bit hashes (as int64) of elements (rows[i], col < n_cols) that dropout compares with its threshold.
  m.def("dropout_bits(Tensor seed, Tensor rows, int n_cols) -> Tensor");
  // Attention of packed sequences: qkv (T, 3, heads, head_dim) -> (T, heads, head_dim), each sequence
  // [cu_seqlens[b], cu_seqlens[b + 1]) attending to itself; max_seqlen bounds the longest. bias: the score bias
  // of each key - query distance d at [head, d + max_seqlen - 1], (heads, 2 * max_seqlen - 1) float32,
  // differentiable. seed and dropout_p: dropout on the probabilities with the shared mask (row token * heads +
  // head, column the key's position in its sequence). window: query i sees only keys |i - j| <= window of its
  // sequence (sliding-window attention). columns: each token's column in its padded row, from which the bias's
  // and the window's distances are counted where a row's tokens are not one run (a mask with holes).
  // pos_key, pos_query (positions, heads, head_dim) float32 and pos_index (2 * max_seqlen - 1) integers: DeBERTa's
  // disentangled attention, the score of query i and key j gaining scale * (q_i . pos_key[c] + k_j . pos_query[c])
  // with c = pos_index[(j - i) + max_seqlen - 1] (either table may be absent).
  // Differentiable in qkv, bias, pos_key and pos_query (autograd.cpp).
  m.def("attention(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, float scale, Tensor? bias=None, "
        "Tensor? seed=None, float dropout_p=0.0, int? window=None, Tensor? columns=None, Tensor? pos_key=None, "
        "Tensor? pos_query=None, Tensor? pos_index=None) -> Tensor");
  // attention's output and the log-sum-exp of each (token, head) score row, (T, heads) float32.
  m.def("attention_forward(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, float scale, Tensor? bias=None, "
        "Tensor? seed=None, float dropout_p=0.0, int? window=None, Tensor? columns=None, Tensor? pos_key=None, "
        "Tensor? pos_query=None, Tensor? pos_index=None) -> (Tensor, Tensor)");
  // (dqkv, dbias, dpos_key, dpos_query) of attention for the gradient dout, from qkv and the log-sum-exp (each
  // of the last three (0,) where its input is absent).
  m.def("attention_backward(Tensor dout, Tensor qkv, Tensor lse, Tensor cu_seqlens, SymInt max_seqlen, "
        "float scale, Tensor? bias=None, Tensor? seed=None, float dropout_p=0.0, int? window=None, "
        "Tensor? columns=None, Tensor? pos_key=None, Tensor? pos_query=None, Tensor? pos_index=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Rotary embeddings of packed qkv (T, 3, heads, head_dim): q and k of token t turned by positions[t] *
  // inv_freq (cos and sin rounded to qkv's dtype), v copied; inverse turns the other way (the gradient).
  m.def("rotary(Tensor qkv, Tensor positions, Tensor inv_freq, bool inverse=False) -> Tensor");
  // Gated GELU: x (rows, 2 N) -> gelu(x[:, :N]) * x[:, N:], exact GELU; and its gradient (rows, 2 N) for dy.
  m.def("geglu(Tensor x) -> Tensor");
  m.def("geglu_backward(Tensor dy, Tensor x) -> Tensor");
  // Forward-only LayerNorm(x + bias + residual) over the last dimension (bias None: LayerNorm(x + residual)).
  m.def("add_layernorm(Tensor x, Tensor? bias, Tensor residual, Tensor ln_weight, Tensor ln_bias, float eps) "
        "-> Tensor");
  // Inference on a weight prepacked by bertfast.prepacked (an opaque oneDNN tensor: float32, bf16, or int8 with its
  // per-output-channel weight_scale): x (rows, in) -> activation(x W^T + bias), activation 'none', 'gelu' (erf)
  // or 'gelu_tanh'; int8 quantizes x per row (linear.cpp).
  m.def("linear(Tensor x, Tensor weight, Tensor? weight_scale, Tensor? bias, str activation='none') -> Tensor");
  // One BERT encoder layer of packed tokens, inference only: the qkv, attention output, up and down weights
  // (prepacked, with their int8 scales or None) and the vectors qkv bias, attention output bias, LayerNorm 1
  // weight and bias, up bias, down bias, LayerNorm 2 weight and bias; eps of the two LayerNorms; the up
  // projection's activation as in linear; attention_bias, pos_key, pos_query and pos_index as attention's bias and
  // disentangled terms (MPNet's and DeBERTa's relative positions).
  m.def("encoder_layer(Tensor hidden, Tensor cu_seqlens, SymInt max_seqlen, Tensor[] weights, "
        "Tensor?[] weight_scales, Tensor[] vectors, int heads, float scale, float[] eps, str activation, "
        "Tensor? attention_bias=None, Tensor? pos_key=None, Tensor? pos_query=None, Tensor? pos_index=None) "
        "-> Tensor");
}
