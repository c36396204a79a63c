// The gradients of the differentiable native ops, registered for the Autograd key: the forward calls the op
// below autograd (so the dispatcher still picks the kernel for the device), the backward calls its backward op.
// Everything here is C++, so an eager call that records nothing costs what an ATen op costs.
#include <torch/autograd.h>
#include <torch/library.h>

namespace bertfast {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_bias_gelu(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bertfast::bias_gelu", "")
                             .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(x, bias);
}

std::tuple<at::Tensor, at::Tensor> call_bias_gelu_backward(const at::Tensor& dy, const at::Tensor& x,
                                                           const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bertfast::bias_gelu_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&)>();
  return op.call(dy, x, bias);
}

at::Tensor call_dropout(const at::Tensor& x, const at::Tensor& seed, double p, const std::optional<at::Tensor>& rows) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bertfast::dropout", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double,
                                               const std::optional<at::Tensor>&)>();
  return op.call(x, seed, p, rows);
}

using OptTensor = std::optional<at::Tensor>;

using OptInt = std::optional<int64_t>;

// attention's optional tensors after max_seqlen and scale: bias, seed, then (after dropout_p and window) columns and
// DeBERTa's pos_key, pos_query and pos_index.
struct AttentionOptions {
  OptTensor bias, seed;
  double p;
  OptInt window;
  OptTensor columns, pos_key, pos_query, pos_index;
};

using AttentionSignature = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, double, const OptTensor&,
                                      const OptTensor&, double, OptInt, const OptTensor&, const OptTensor&,
                                      const OptTensor&, const OptTensor&);

at::Tensor call_attention(const at::Tensor& qkv, const at::Tensor& cu, const c10::SymInt& max_seqlen, double scale,
                          const AttentionOptions& o) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bertfast::attention", "").typed<AttentionSignature>();
  return op.call(qkv, cu, max_seqlen, scale, o.bias, o.seed, o.p, o.window, o.columns, o.pos_key, o.pos_query,
                 o.pos_index);
}

std::tuple<at::Tensor, at::Tensor> call_attention_forward(const at::Tensor& qkv, const at::Tensor& cu,
                                                          const c10::SymInt& max_seqlen, double scale,
                                                          const AttentionOptions& o) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bertfast::attention_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, c10::SymInt, double, const OptTensor&,
                                 const OptTensor&, double, OptInt, const OptTensor&, const OptTensor&,
                                 const OptTensor&, const OptTensor&)>();
  return op.call(qkv, cu, max_seqlen, scale, o.bias, o.seed, o.p, o.window, o.columns, o.pos_key, o.pos_query,
                 o.pos_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_attention_backward(
    const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& lse, const at::Tensor& cu,
    const c10::SymInt& max_seqlen, double scale, const AttentionOptions& o) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bertfast::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt, double,
              const OptTensor&, const OptTensor&, double, OptInt, const OptTensor&, const OptTensor&,
              const OptTensor&, const OptTensor&)>();
  return op.call(dout, qkv, lse, cu, max_seqlen, scale, o.bias, o.seed, o.p, o.window, o.columns, o.pos_key,
                 o.pos_query, o.pos_index);
}

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Saves qkv and the log-sum-exp; backward recomputes the probabilities (and the dropout mask) from them.
class Attention : public torch::autograd::Function<Attention> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& cu,
                            const c10::SymInt& max_seqlen, double scale, const OptTensor& bias, const OptTensor& seed,
                            double p, OptInt window, const OptTensor& columns, const OptTensor& pos_key,
                            const OptTensor& pos_query, const OptTensor& pos_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const AttentionOptions o{bias, seed, p, window, columns, pos_key, pos_query, pos_index};
    auto [out, lse] = call_attention_forward(qkv, cu, max_seqlen, scale, o);
    const at::Tensor none;
    ctx->save_for_backward({qkv, cu, lse, bias.value_or(none), seed.value_or(none), columns.value_or(none),
                            pos_key.value_or(none), pos_query.value_or(none), pos_index.value_or(none)});
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["p"] = p;
    ctx->saved_data["window"] = window ? *window : -1;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const int64_t saved_window = ctx->saved_data["window"].toInt();
    const AttentionOptions o{optional_of(s[3]), optional_of(s[4]), ctx->saved_data["p"].toDouble(),
                             saved_window >= 0 ? OptInt(saved_window) : std::nullopt, optional_of(s[5]),
                             optional_of(s[6]), optional_of(s[7]), optional_of(s[8])};
    auto [dqkv, dbias, dpos_key, dpos_query] = call_attention_backward(
        grads[0].contiguous(), s[0], s[2], s[1], ctx->saved_data["max_seqlen"].toSymInt(),
        ctx->saved_data["scale"].toDouble(), o);
    // One gradient per forward input: qkv, cu_seqlens, max_seqlen, scale, bias, seed, dropout_p, window, columns,
    // pos_key, pos_query, pos_index.
    const at::Tensor none;
    return {dqkv, none, none, none, o.bias ? dbias : none, none, none, none, none, o.pos_key ? dpos_key : none,
            o.pos_query ? dpos_query : none, none};
  }
};

at::Tensor call_rotary(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq, bool inverse) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bertfast::rotary", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(qkv, positions, inv_freq, inverse);
}

// A rotation's gradient is the rotation the other way (v's gradient passes through).
class Rotary : public torch::autograd::Function<Rotary> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& positions,
                            const at::Tensor& inv_freq, bool inverse) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({positions, inv_freq});
    ctx->saved_data["inverse"] = inverse;
    return call_rotary(qkv, positions, inv_freq, inverse);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    return {call_rotary(grads[0].contiguous(), s[0], s[1], !ctx->saved_data["inverse"].toBool()), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor call_geglu(const at::Tensor& x) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bertfast::geglu", "").typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

at::Tensor call_geglu_backward(const at::Tensor& dy, const at::Tensor& x) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bertfast::geglu_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(dy, x);
}

class Geglu : public torch::autograd::Function<Geglu> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x});
    return call_geglu(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {call_geglu_backward(grads[0].contiguous(), ctx->get_saved_variables()[0])};
  }
};

class BiasGelu : public torch::autograd::Function<BiasGelu> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, bias.value_or(at::Tensor())});
    return call_bias_gelu(x, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> bias = saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    auto [dx, db] = call_bias_gelu_backward(grads[0], saved[0], bias);
    return {dx, bias ? db : at::Tensor()};
  }
};

class Dropout : public torch::autograd::Function<Dropout> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& seed, double p,
                            const std::optional<at::Tensor>& rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({seed, rows.value_or(at::Tensor())});
    ctx->saved_data["p"] = p;
    return call_dropout(x, seed, p, rows);
  }

  // The mask is a function of (seed, row, column): the gradient is the same dropout of dy.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> rows = saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    return {call_dropout(grads[0], saved[0], ctx->saved_data["p"].toDouble(), rows), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// A call that records nothing runs the op below autograd: the inference kernel when there is no dropout.
at::Tensor attention_autograd(const at::Tensor& qkv, const at::Tensor& cu, c10::SymInt max_seqlen, double scale,
                              const OptTensor& bias, const OptTensor& seed, double p, OptInt window,
                              const OptTensor& columns, const OptTensor& pos_key, const OptTensor& pos_query,
                              const OptTensor& pos_index) {
  const auto needs_grad = [](const OptTensor& t) { return t && t->requires_grad(); };
  const bool records = at::GradMode::is_enabled() &&
                       (qkv.requires_grad() || needs_grad(bias) || needs_grad(pos_key) || needs_grad(pos_query));
  if (records) {
    return Attention::apply(qkv, cu, max_seqlen, scale, bias, seed, p, window, columns, pos_key, pos_query,
                            pos_index);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_attention(qkv, cu, max_seqlen, scale,
                        AttentionOptions{bias, seed, p, window, columns, pos_key, pos_query, pos_index});
}

at::Tensor rotary_autograd(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& inv_freq,
                           bool inverse) {
  return Rotary::apply(qkv, positions, inv_freq, inverse);
}

at::Tensor geglu_autograd(const at::Tensor& x) { return Geglu::apply(x); }

at::Tensor bias_gelu_autograd(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  return BiasGelu::apply(x, bias);
}

at::Tensor dropout_autograd(const at::Tensor& x, const at::Tensor& seed, double p,
                            const std::optional<at::Tensor>& rows) {
  return Dropout::apply(x, seed, p, rows);
}

}  // namespace

}  // namespace bertfast

TORCH_LIBRARY_IMPL(bertfast, Autograd, m) {
  m.impl("bias_gelu", &bertfast::bias_gelu_autograd);
  m.impl("dropout", &bertfast::dropout_autograd);
  m.impl("attention", &bertfast::attention_autograd);
  m.impl("rotary", &bertfast::rotary_autograd);
  m.impl("geglu", &bertfast::geglu_autograd);
}
