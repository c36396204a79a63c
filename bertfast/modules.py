"""The BERT module tree, and the packed-token functions that run any tree of its shape.

The functions (``packed_embeddings``, ``packed_layer``, ``packed_encoder``, ...) read submodules by
transformers' names (``attention.self.query``, ``output.LayerNorm``, ...), so the same code runs
bertfast's modules below and transformers' own BERT-family modules (``bertfast.accelerate``).
Activations are packed tokens, ``(T, hidden)`` with the padding removed, and everything but the
dense matmuls goes through ``bertfast.ops``.

A plain ``nn.Linear`` whose output goes straight into a fused op is applied without its bias
(``F.linear(x, weight)``) and the op adds the bias in its single pass. Any other module in that
place (a PEFT LoRA layer, a quantized Linear, a user's wrapper) is called as a module, so that
whatever it does takes effect.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bertfast import ops, prepacked
from bertfast.config import BertConfig
from bertfast.padding import Packing

# Activation modules the fused bias+GELU op implements, by class name (transformers' ones are
# matched by name so that this module does not import transformers), and the GELU form of each.
_GELU_BY_CLASS = {"GELUActivation": "none", "NewGELUActivation": "tanh", "GELUTanh": "tanh"}


def gelu_form(activation: nn.Module) -> str | None:
    """"none" / "tanh" when ``activation`` is a GELU the fused ops implement, else None (run it as a module)."""
    if type(activation) is nn.GELU:
        return activation.approximate
    return _GELU_BY_CLASS.get(type(activation).__name__)


def linear_parts(linear: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(x @ W^T, bias) of a plain ``nn.Linear``, for a fused op to add the bias; (linear(x), None) otherwise."""
    if type(linear) is nn.Linear:
        return F.linear(x, linear.weight), linear.bias
    return linear(x), None


def _plain_layernorm(norm: nn.Module) -> bool:
    return type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None


def packed_embeddings(
    embeddings: nn.Module, input_ids: Tensor | None, position_ids: Tensor, token_type_ids: Tensor,
    inputs_embeds: Tensor | None, training: bool,
) -> Tensor:
    """Packed (T,) ids (or (T, hidden) ``inputs_embeds``) -> dropout(LayerNorm(word + position + type)), (T, hidden)."""
    words = embeddings.word_embeddings
    if inputs_embeds is None and type(words) is not nn.Embedding:  # a wrapped embedding: use what it returns
        inputs_embeds, input_ids = words(input_ids), None
    norm = embeddings.LayerNorm
    p = embeddings.dropout.p
    if not _plain_layernorm(norm):
        if inputs_embeds is None:
            inputs_embeds = words(input_ids)
        x = inputs_embeds + embeddings.position_embeddings(position_ids) + embeddings.token_type_embeddings(
            token_type_ids)
        return F.dropout(norm(x), p, training)
    return ops.embeddings(
        input_ids, position_ids, token_type_ids, words.weight, embeddings.position_embeddings.weight,
        embeddings.token_type_embeddings.weight, norm.weight, norm.bias, norm.eps, p, training,
        inputs_embeds=inputs_embeds, padding_idx=words.padding_idx,
    )


def _fused_qkv_weights(
    attention: nn.Module, training: bool, linears: tuple[nn.Linear, nn.Linear, nn.Linear] | None = None,
) -> tuple[Tensor, Tensor]:
    """q, k and v weights (and biases) concatenated for one matmul.

    ``linears`` are the three projections, ``attention.query/key/value`` by default (other families
    name them otherwise); ``attention`` is the module that holds them and the inference cache.

    With autograd recording, the concatenation is part of the graph. Without it (inference), the
    result is cached on the module (``prepacked.cached``, the packed weights' cache), so a served model
    pays for it once. The cache is dropped when one of the six tensors is replaced or modified in place
    (its version counter moves), and by every training-mode forward: fused optimizers update parameters
    without moving version counters, but any optimizer step follows a training forward.
    """
    if linears is None:
        linears = (attention.query, attention.key, attention.value)
    tensors = [t for lin in linears for t in (lin.weight, lin.bias)]
    if training:
        prepacked.drop_cache(attention)
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if training or recorded or torch.compiler.is_compiling():  # a compiled graph holds its own copy
        return torch.cat(tensors[0::2]), torch.cat(tensors[1::2])
    return prepacked.cached(attention, "qkv", tensors, lambda: (torch.cat(tensors[0::2]), torch.cat(tensors[1::2])))


def packed_self_attention(attention: nn.Module, hidden: Tensor, packing: Packing, training: bool) -> Tensor:
    """Multi-head self-attention of packed tokens, (T, hidden) -> (T, heads * head_dim)."""
    heads, head_dim = attention.num_attention_heads, attention.attention_head_size
    linears = (attention.query, attention.key, attention.value)
    if all(type(lin) is nn.Linear and lin.bias is not None for lin in linears):
        weight, bias = _fused_qkv_weights(attention, training)
        qkv = F.linear(hidden, weight, bias)
    else:  # some projection is not a plain Linear: each one runs as its module
        qkv = torch.stack([lin(hidden) for lin in linears], dim=1)
    qkv = qkv.view(-1, 3, heads, head_dim)
    context = ops.attention(qkv, packing.cu_seqlens, packing.max_seqlen, attention.dropout.p, training)
    return context.reshape(qkv.shape[0], heads * head_dim)


def packed_add_norm(block: nn.Module, x: Tensor, residual: Tensor, training: bool) -> Tensor:
    """LayerNorm(dropout(dense(x)) + residual) of a block with ``dense``, ``dropout`` and ``LayerNorm``."""
    y, bias = linear_parts(block.dense, x)
    norm = block.LayerNorm
    if _plain_layernorm(norm):
        return ops.bias_dropout_add_layernorm(y, bias, residual, norm.weight, norm.bias, norm.eps,
                                              block.dropout.p, training)
    if bias is not None:
        y = y + bias
    return norm(F.dropout(y, block.dropout.p, training) + residual)


def packed_intermediate(intermediate: nn.Module, x: Tensor) -> Tensor:
    """activation(dense(x)): fused bias + GELU, or the module's own activation when it is another one."""
    y, bias = linear_parts(intermediate.dense, x)
    form = gelu_form(intermediate.intermediate_act_fn)
    if form is None:
        return intermediate.intermediate_act_fn(y if bias is None else y + bias)
    return ops.bias_gelu(y, bias, form)


def prepacked_layer(
    owner: nn.Module, hidden: Tensor, packing: Packing, rows: Tensor | None, training: bool,
    linears: tuple[tuple[nn.Module, ...], ...], norms: tuple[nn.Module, nn.Module], activation: nn.Module,
    heads: int, head_dim: int, scale: float | None = None,
    attention: Callable[[], dict[str, Tensor | None]] | None = None,
) -> Tensor | None:
    """A BERT-shaped layer in one native call on its prepacked weights (``bertfast.prepacked``), or None where
    that call cannot honour the layer or the call (the caller then runs the layer op by op).

    ``linears`` (q, k, v), (attention output,), (up,), (down,) must be Linear layers with biases, all float or
    all int8; ``norms`` LayerNorms with both affine vectors; ``activation`` a GELU; ``scale`` the scores' (default
    1 / sqrt(head_dim)); ``attention`` gives what the attention adds to its scores, by ``prepacked.encoder_layer``'s
    names (MPNet's bias by distance, DeBERTa's position tables). The call must be an inference call of every
    row that the native path serves (``prepacked.packable``). A training call drops ``owner``'s packed weights:
    an optimizer step may follow."""
    if training:  # (under torch.compile too: a compiled training step is followed by an optimizer step as well)
        prepacked.drop_cache(owner)
        return None
    if rows is not None or torch.compiler.is_compiling():  # a compiled graph packs its weights itself
        return None
    kinds = {type(lin) for group in linears for lin in group}
    if kinds not in ({nn.Linear}, {prepacked.Int8Linear}) or any(lin.bias is None for g in linears for lin in g):
        return None
    form = gelu_form(activation)
    if form is None or not all(_plain_layernorm(n) for n in norms) or torch.is_autocast_enabled("cpu"):
        return None
    if ops.forced_backend() not in (None, "native") or not prepacked.packable(hidden, owner):
        return None
    return prepacked.encoder_layer(owner, hidden, packing, linears, norms, form, heads, head_dim, scale,
                                   **({} if attention is None else attention()))


def packed_layer(layer: nn.Module, hidden: Tensor, packing: Packing, rows: Tensor | None, training: bool) -> Tensor:
    """One encoder layer. With ``rows``, every token is a key but only those rows go on (the rest is per row).
    An inference call runs the whole layer natively on prepacked weights where it can (``prepacked_layer``)."""
    attention = layer.attention
    fused = prepacked_layer(
        layer, hidden, packing, rows, training,
        ((attention.self.query, attention.self.key, attention.self.value), (attention.output.dense,),
         (layer.intermediate.dense,), (layer.output.dense,)),
        (attention.output.LayerNorm, layer.output.LayerNorm), layer.intermediate.intermediate_act_fn,
        attention.self.num_attention_heads, attention.self.attention_head_size)
    if fused is not None:
        return fused
    context = packed_self_attention(attention.self, hidden, packing, training)
    if rows is not None:
        context, hidden = context.index_select(0, rows), hidden.index_select(0, rows)
    attended = packed_add_norm(attention.output, context, hidden, training)
    return packed_add_norm(layer.output, packed_intermediate(layer.intermediate, attended), attended, training)


# The keywords with which the packed encoder calls a layer module. Only bertfast passes them: a layer
# class's forward that sees them runs ``packed_layer`` (bertfast's own layers, and transformers' layers
# through the drop-in's class-level wrapper), anything else runs the class's own forward.
PACKING_KEY = "bertfast_packing"
ROWS_KEY = "bertfast_rows"


def packed_encoder(
    encoder: nn.Module, hidden: Tensor, packing: Packing, training: bool, output_hidden_states: bool = False,
    last_layer_rows: Tensor | None = None,
) -> list[Tensor]:
    """Every layer of ``encoder.layer`` on packed tokens; returns [last] or [embeddings, layer 1, ..., last].

    With ``last_layer_rows`` the last layer computes only those rows (its attention still reads every
    token as a key), like flash-attention's BERT does for the MLM loss. Each layer is called as a
    module, so a layer class that checkpoints itself (transformers' ``GradientCheckpointingLayer``)
    does so with its own flag and function. The encoder's ``gradient_checkpointing`` flag (bertfast's
    place for it) checkpoints each layer call here, with the encoder's ``_gradient_checkpointing_func``
    when it has one, else non-reentrant checkpointing (which replays the dropout masks).
    """
    states = [hidden]
    last = len(encoder.layer) - 1
    recompute = training and torch.is_grad_enabled() and getattr(encoder, "gradient_checkpointing", False)
    run = (getattr(encoder, "_gradient_checkpointing_func", None) or partial(checkpoint, use_reentrant=False)
           if recompute else None)
    for i, layer in enumerate(encoder.layer):
        rows = last_layer_rows if i == last else None
        if recompute:
            hidden = run(partial(layer, **{PACKING_KEY: packing, ROWS_KEY: rows}), hidden)
        else:
            hidden = layer(hidden, **{PACKING_KEY: packing, ROWS_KEY: rows})
        states.append(hidden)
    return states if output_hidden_states else [hidden]


# ------------------------------------------------------------------------ bertfast's module tree
class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: Tensor | None, position_ids: Tensor, token_type_ids: Tensor,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Packed (T,) ids (or (T, hidden) ``inputs_embeds``) -> (T, hidden)."""
        return packed_embeddings(self, input_ids, position_ids, token_type_ids, inputs_embeds, self.training)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden: Tensor, packing: Packing) -> Tensor:
        return packed_self_attention(self, hidden, packing, self.training)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return packed_add_norm(self, hidden, residual, self.training)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = nn.GELU(approximate=config.gelu_approximate)

    def forward(self, hidden: Tensor) -> Tensor:
        return packed_intermediate(self, hidden)


class BertOutput(BertSelfOutput):
    """The feed-forward block's down projection, dropout, residual and LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: Tensor, bertfast_packing: Packing, bertfast_rows: Tensor | None = None) -> Tensor:
        """The packed encoder's call (``PACKING_KEY`` / ``ROWS_KEY``): see ``packed_layer``."""
        return packed_layer(self, hidden, bertfast_packing, bertfast_rows, self.training)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(
        self, hidden: Tensor, packing: Packing, output_hidden_states: bool = False,
        last_layer_rows: Tensor | None = None,
    ) -> list[Tensor]:
        return packed_encoder(self, hidden, packing, self.training, output_hidden_states, last_layer_rows)


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, first_token: Tensor) -> Tensor:
        return self.activation(prepacked.dense(self.dense, first_token, self.training))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.transform_act_fn = nn.GELU(approximate=config.gelu_approximate)

    def forward(self, hidden: Tensor) -> Tensor:
        y, bias = linear_parts(self.dense, hidden)
        form = gelu_form(self.transform_act_fn)
        if form is None or not _plain_layernorm(self.LayerNorm):
            return self.LayerNorm(self.transform_act_fn(y if bias is None else y + bias))
        return ops.bias_gelu_layernorm(y, bias, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, form)


class BertLMPredictionHead(nn.Module):
    """transform -> decoder. The decoder weight is tied to the word embeddings and its bias to ``bias``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden: Tensor) -> Tensor:
        """Full logits (rows, vocab): only used when the caller asks for logits."""
        return self.decoder(self.transform(hidden))

    def loss(self, hidden: Tensor, labels: Tensor, chunk_bytes: int | None = None) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy, number correct) over rows of ``hidden`` whose label is not -100.

        The (rows, vocab) logits are never all built at once: the fused op works in chunks. A decoder
        that is not a plain Linear (an adapter, a quantized layer) is called as a module instead.
        """
        transformed = self.transform(hidden)
        if type(self.decoder) is not nn.Linear:
            return _module_cross_entropy(self.decoder(transformed), labels)
        return ops.linear_cross_entropy(transformed, self.decoder.weight, self.bias, labels, chunk_bytes=chunk_bytes)


def _module_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(mean loss, number correct) like ``ops.linear_cross_entropy``, from logits a module produced."""
    valid = labels != ops.IGNORE_INDEX
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ops.IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        n_correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss / valid.sum().clamp(min=1), n_correct


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertPreTrainingHeads(BertOnlyMLMHead):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)
