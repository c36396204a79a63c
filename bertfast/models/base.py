"""BertPreTrainedModel (init, checkpoints, input checks) and BertModel (the encoder with its pooler)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from bertfast.config import BertConfig
from bertfast.io import SAFE_WEIGHTS_NAME, CheckpointError, load_state_dict, save_safetensors
from bertfast.modules import (
    BertEmbeddings,
    BertEncoder,
    BertLMPredictionHead,
    BertPooler,
    packed_embeddings,
    packed_encoder,
)
from bertfast.outputs import BaseModelOutputWithPooling, ModelOutput
from bertfast.padding import Packing, gather_rows, kept_positions

logger = logging.getLogger("bertfast")

M = TypeVar("M", bound="BertPreTrainedModel")

# Tied parameters: saved once under the source name, as transformers saves them.
TIED_KEYS = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
# Buffers that older checkpoints stored but that carry nothing.
IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclass
class Encoded:
    """The encoder's result on packed tokens, before any padding is put back."""

    packing: Packing
    hidden: Tensor  # (T, hidden): the last layer; (len(rows), hidden) when only some rows were computed
    states: list[Tensor] | None  # embeddings and every layer, packed, when hidden states were asked for
    pooled: Tensor | None  # (batch, hidden)
    rows: Tensor | None = None  # the packed rows that ``hidden`` holds, ascending; None = all T

    def row_of(self, packed_rows: Tensor) -> Tensor:
        """Where the given packed rows (which must have been computed) are in ``hidden``."""
        return packed_rows if self.rows is None else torch.searchsorted(self.rows, packed_rows)

    def select(self, packed_rows: Tensor) -> Tensor:
        """Last-layer outputs of the given packed rows (which must have been computed)."""
        return self.hidden.index_select(0, self.row_of(packed_rows))

    def padded_states(self) -> tuple[Tensor, ...] | None:
        return None if self.states is None else tuple(self.packing.unpack(s) for s in self.states)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype (use e.g. 'float16' or 'bfloat16')")
    return resolved


def _legacy_rename(key: str) -> str:
    """Names used by TF-converted BERT checkpoints -> current names."""
    if key.endswith(".gamma"):
        return key[: -len(".gamma")] + ".weight"
    if key.endswith(".beta"):
        return key[: -len(".beta")] + ".bias"
    return key


def _model_base() -> type[nn.Module]:
    """transformers' ``PreTrainedModel`` when transformers is installed, else ``nn.Module``.

    Trainer, PEFT and pipelines recognise a model by ``isinstance(model, PreTrainedModel)`` (Trainer's
    ``save_model`` writes only bare weights, no config.json, for anything else), so bertfast's models
    are PreTrainedModels where that class exists. They borrow nothing else from it: initialisation,
    configs, checkpoints and every method a client calls are bertfast's own (below), and the
    nn.Module methods that PreTrainedModel overrides with hooks for quantizers are reset to
    nn.Module's. Without transformers, bertfast stands alone.
    """
    if importlib.util.find_spec("transformers") is None:
        class Standalone(nn.Module):
            def __init__(self, config: Any) -> None:
                super().__init__()
                self.config = config

        return Standalone
    from transformers import PreTrainedModel

    class TransformersCompatible(PreTrainedModel):
        to, cuda, half, float, train, eval = (nn.Module.to, nn.Module.cuda, nn.Module.half, nn.Module.float,
                                              nn.Module.train, nn.Module.eval)

        def __init__(self, config: Any) -> None:
            nn.Module.__init__(self)  # PreTrainedModel.__init__ requires transformers' config class
            self.config = config
            self.name_or_path = ""

    return TransformersCompatible


class BertPreTrainedModel(_model_base()):
    """Weight initialisation, ``from_pretrained`` / ``save_pretrained`` and shared input handling."""

    base_model_prefix = "bert"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_save = None

    def __init__(self, config: BertConfig):
        super().__init__(config)

    # ----------------------------------------------------------------- init
    def post_init(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Tie the MLM decoder to the word embeddings (models with an MLM head)."""
        head = getattr(getattr(self, "cls", None), "predictions", None)
        if head is not None:
            head.decoder.weight = self.get_input_embeddings().weight
            head.decoder.bias = head.bias

    def get_input_embeddings(self) -> nn.Embedding:
        base = getattr(self, self.base_model_prefix, self)
        return base.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        base = getattr(self, self.base_model_prefix, self)
        base.embeddings.word_embeddings = value
        self.tie_weights()

    def get_output_embeddings(self) -> nn.Module | None:
        """The MLM decoder (tied to the word embeddings), or None for models without an MLM head."""
        head = getattr(getattr(self, "cls", None), "predictions", None)
        return None if head is None else head.decoder

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Grow or shrink the vocabulary (as transformers does): kept rows are copied, new rows start at
        the mean of the old ones (or random with ``mean_resizing=False``), the MLM bias follows."""
        old = self.get_input_embeddings()
        if new_num_tokens is None:
            new_num_tokens = old.num_embeddings
        if pad_to_multiple_of is not None:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens <= 0:
            raise ValueError(f"new_num_tokens must be positive, got {new_num_tokens}")
        if new_num_tokens == old.num_embeddings:
            return old
        new = nn.Embedding(new_num_tokens, old.embedding_dim, padding_idx=old.padding_idx,
                           device=old.weight.device, dtype=old.weight.dtype)
        kept = min(new_num_tokens, old.num_embeddings)
        with torch.no_grad():
            if mean_resizing:
                new.weight.copy_(old.weight.mean(dim=0, keepdim=True).expand_as(new.weight))
            else:
                nn.init.normal_(new.weight, std=self.config.initializer_range)
            new.weight[:kept] = old.weight[:kept]
        head = getattr(getattr(self, "cls", None), "predictions", None)
        if head is not None:
            bias = torch.zeros(new_num_tokens, device=head.bias.device, dtype=head.bias.dtype)
            bias[:kept] = head.bias.detach()[:kept]
            head.bias = nn.Parameter(bias)
            head.decoder.out_features = new_num_tokens
        self.config.vocab_size = new_num_tokens
        self.set_input_embeddings(new)
        return new

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False,
    ) -> None:
        """Recompute each encoder layer in backward instead of keeping its activations.

        ``gradient_checkpointing_kwargs`` is accepted for transformers' Trainer; bertfast always uses
        non-reentrant checkpointing (it replays the dropout masks and works with frozen inputs).
        transformers' ``activation_checkpointing_enable`` lands here too; its ``every_n_layers`` and
        ``offload`` options are refused rather than ignored.
        """
        if every_n_layers != 1 or offload:
            raise ValueError("bertfast checkpoints every encoder layer and keeps the activations in place: "
                             f"every_n_layers={every_n_layers}, offload={offload} is not supported")
        for module in self.modules():
            if isinstance(module, BertEncoder):
                module.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, BertEncoder):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules() if isinstance(m, BertEncoder))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (tied ones too), as transformers counts them."""
        unique = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for module in self.modules():
                if isinstance(module, nn.Embedding):
                    unique.pop(id(module.weight), None)
        return sum(p.numel() for p in unique.values() if p.requires_grad or not only_trainable)

    def floating_point_ops(self, inputs: dict[str, Any], exclude_embeddings: bool = True) -> int:
        """6 x tokens x parameters: transformers' estimate of a training step's FLOPs (Trainer logs it)."""
        ids = inputs.get(self.main_input_name)
        tokens = ids.numel() if isinstance(ids, Tensor) else 0
        return 6 * tokens * self.num_parameters(exclude_embeddings=exclude_embeddings)

    def can_generate(self) -> bool:
        return False

    # ---------------------------------------------------------- checkpoints
    def save_pretrained(
        self, directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None,
        is_main_process: bool = True, safe_serialization: bool = True, **kwargs: Any,
    ) -> None:
        """Write config.json + model.safetensors, loadable by transformers' class of the same name.

        The same call as transformers' (Trainer passes ``state_dict`` and ``is_main_process``). Weights
        are always safetensors: ``safe_serialization=False`` (a pickle) is refused.
        """
        if not safe_serialization:
            raise ValueError("bertfast writes safetensors only; safe_serialization=False is not supported")
        if not is_main_process:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        state = self.state_dict() if state_dict is None else state_dict
        state = {k: v for k, v in state.items() if k not in TIED_KEYS}
        save_safetensors(state, directory / SAFE_WEIGHTS_NAME)
        self.config.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls: type[M],
        path: str | os.PathLike,
        config: BertConfig | None = None,
        strict: bool = False,
        dtype: torch.dtype | None = None,
        output_loading_info: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        **config_overrides: Any,
    ) -> M | tuple[M, dict[str, list[str]]]:
        """Load a transformers-format checkpoint directory (config.json + safetensors / bin / shards).

        ``config_overrides`` change config fields (``num_labels=3``). Weights whose shape does not fit
        the config raise :class:`CheckpointError`; missing and unexpected weights are logged (or raise
        with ``strict=True``) and returned with ``output_loading_info=True``. ``dtype`` (or its older
        transformers name ``torch_dtype``) is a torch dtype or its name ("float16", "bfloat16", ...).
        """
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
        dtype = dtype if dtype is not None else torch_dtype
        if config is None:
            config = BertConfig.from_pretrained(path)
        if dtype == "auto":  # the dtype the checkpoint says it was saved in
            dtype = config.extra.get("dtype", config.extra.get("torch_dtype"))
        dtype = _resolve_dtype(dtype)
        if config_overrides:
            values = config.to_dict()
            if "num_labels" in config_overrides and "id2label" not in config_overrides:
                values.pop("id2label", None)
                values.pop("label2id", None)
            values.update(config_overrides)
            config = BertConfig.from_dict(values)
        model = cls(config)
        info = model.load_checkpoint_state(load_state_dict(path), strict=strict, source=str(path))
        if dtype is not None:
            model.to(dtype)
        model.eval()
        return (model, info) if output_loading_info else model

    @classmethod
    def from_transformers(cls: type[M], model: nn.Module) -> M:
        """A bertfast model with the same config and weights as a live transformers BERT model.

        ``bertfast.BertForSequenceClassification.from_transformers(hf_model)``; the result is on the
        same device, in the same dtype and mode. Any weight that does not carry over is an error.
        """
        config = BertConfig.from_dict(model.config.to_dict())
        ours = cls(config)
        source = f"transformers {type(model).__name__}"
        ours.load_checkpoint_state(model.state_dict(), strict=True, source=source)
        parameter = next(model.parameters())
        return ours.to(device=parameter.device, dtype=parameter.dtype).train(model.training)

    def load_checkpoint_state(
        self, state: dict[str, Tensor], strict: bool = False, source: str = "checkpoint"
    ) -> dict[str, list[str]]:
        """Load a transformers-style state dict, with or without the ``bert.`` prefix."""
        state = {_legacy_rename(k): v for k, v in state.items() if not k.endswith(IGNORED_KEYS)}
        expected = {k: v for k, v in self.state_dict().items() if k not in TIED_KEYS}
        prefix = self.base_model_prefix + "."
        model_prefixed = any(k.startswith(prefix) for k in expected)
        ckpt_prefixed = any(k.startswith(prefix) for k in state)
        if model_prefixed and not ckpt_prefixed:
            state = {prefix + k: v for k, v in state.items()}
        elif ckpt_prefixed and not model_prefixed:
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k not in TIED_KEYS}

        mismatched = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in state.items() if k in expected and v.shape != expected[k].shape
        ]
        if mismatched:
            raise CheckpointError(
                f"weights in {source} do not fit the config ({len(mismatched)} mismatched): "
                + "; ".join(mismatched)
            )
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if len(missing) == len(expected):
            raise CheckpointError(f"{source} holds none of the weights of {type(self).__name__}")
        if strict and (missing or unexpected):
            raise CheckpointError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
        if missing:
            logger.warning("%s: newly initialised (not in %s): %s", type(self).__name__, source, missing)
        if unexpected:
            logger.warning("%s: unused weights in %s: %s", type(self).__name__, source, unexpected)
        self.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
        self.tie_weights()
        return {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": []}

    # --------------------------------------------------------------- output
    @staticmethod
    def _finish(output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
        return output if return_dict is None or return_dict else output.to_tuple()


def _check_range(name: str, values: Tensor, high: int, what: str) -> None:
    """Raise ValueError naming ``name`` when a value is outside [0, high) (one read-back)."""
    _check_values(None, [(name, values, high, what)])


def _check_values(attention_mask: Tensor | None, ranged: list[tuple[str, Tensor, int, str]]) -> bool:
    """Check that the mask holds only 0/1 and each id tensor is in range, with one host read-back for all.

    Only real positions are checked. Returns whether the mask keeps every position (packing is then a
    reshape). Under torch.compile nothing is read back: out-of-range ids then fail in the embedding
    lookup instead.
    """
    if torch.compiler.is_compiling():
        return False
    stats = []
    real = None if attention_mask is None else attention_mask != 0
    if real is not None:
        stats += [(real & (attention_mask != 1)).any(), real.all()]
    for _, values, _, _ in ranged:
        if real is not None:  # padded positions may hold anything
            values = torch.where(real, values, 0)
        empty = values.numel() == 0
        stats += [values.new_zeros(()) if empty else values.min(), values.new_zeros(()) if empty else values.max()]
    seen = torch.stack([t.long() for t in stats]).tolist()
    full = True
    if attention_mask is not None:
        if seen[0]:
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        full, seen = bool(seen[1]), seen[2:]
    for (name, _, high, what), low_seen, high_seen in zip(ranged, seen[0::2], seen[1::2], strict=True):
        if low_seen < 0 or high_seen >= high:
            bad = low_seen if low_seen < 0 else high_seen
            raise ValueError(f"{name} holds {bad}, outside [0, {high}) ({what})")
    return full


def pack_inputs(
    config: Any, input_ids: Tensor | None, attention_mask: Tensor | None, token_type_ids: Tensor | None,
    position_ids: Tensor | None, inputs_embeds: Tensor | None,
) -> tuple[Packing, dict[str, Tensor | None]]:
    """Check a BERT model's inputs and turn them into packed (T,) tensors, naming whatever is wrong.

    ``config`` is any config with BERT's fields (bertfast's, or transformers' BERT-family configs).
    ``max_position_embeddings`` None: positions index no table (rotary families), so any length runs.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        shape = tuple(input_ids.shape)
        device = input_ids.device
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (batch, seq_len, {config.hidden_size}), "
                f"got shape {tuple(inputs_embeds.shape)}"
            )
        shape = tuple(inputs_embeds.shape[:2])
        device = inputs_embeds.device
    batch, seqlen = shape

    if attention_mask is not None and tuple(attention_mask.shape) != shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs have shape {shape}; "
            "bertfast takes a 2-D (batch, seq_len) mask of 1 (token) and 0 (padding)"
        )
    table = config.max_position_embeddings
    if position_ids is None:
        if table is not None and seqlen > table:
            raise ValueError(
                f"sequence length {seqlen} exceeds max_position_embeddings "
                f"({config.max_position_embeddings}); truncate the input"
            )
        position_ids = torch.arange(seqlen, device=device)
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != seqlen or (
            position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch)):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {shape}")
    if token_type_ids is None:
        token_type_ids = torch.zeros(shape, dtype=torch.long, device=device)
    elif tuple(token_type_ids.shape) != shape:
        raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, expected {shape}")
    position_ids = position_ids.expand(shape)

    ranged = [("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")]
    if table is not None:
        ranged.append(("position_ids", position_ids, table, "max_position_embeddings"))
    if input_ids is not None:
        ranged.insert(0, ("input_ids", input_ids, config.vocab_size, "vocab_size"))
    every_position = _check_values(attention_mask, ranged)
    if attention_mask is None or every_position:
        packing = Packing.from_mask(None, shape, device)
    else:
        packing = Packing.from_mask(attention_mask)
    packed = {
        "input_ids": packing.pack(input_ids) if input_ids is not None else None,
        "position_ids": packing.pack(position_ids),
        "token_type_ids": packing.pack(token_type_ids),
        "inputs_embeds": packing.pack(inputs_embeds) if inputs_embeds is not None else None,
    }
    return packing, packed


def first_token_mask(packing: Packing, attention_mask: Tensor | None) -> Tensor:
    """(batch, seq_len) bool: each row's first real token."""
    if attention_mask is None or packing.indices is None:
        positions = torch.arange(packing.seqlen, device=packing.cu_seqlens.device)
        return (positions == 0).expand(packing.batch, packing.seqlen)
    keep = attention_mask.bool()
    return keep & (keep.cumsum(dim=1) == 1)


def encode(
    base: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    position_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    output_hidden_states: bool = False,
    needed: Tensor | None = None,
    pool_first_token: bool = True,
    embed: Callable[..., Tensor] = packed_embeddings,
    embeddings_require_grad: bool = False,
) -> Encoded:
    """Run a BERT-shaped base model (``embeddings``, ``encoder``, ``config``) on packed tokens.

    The result stays packed. ``needed`` (batch, seq_len) bool marks the only positions whose output
    the caller will read (and each row's first token when ``pool_first_token``): the last layer then
    computes just those. ``embed`` computes the packed embeddings (a family's own function, with
    ``packed_embeddings``' arguments). ``embeddings_require_grad`` marks their output as requiring
    grad, as transformers' ``enable_input_require_grads`` hook does, so that reentrant checkpointing
    of frozen embeddings still reaches the layers' parameters.
    """
    weight = base.embeddings.word_embeddings.weight
    for name, tensor in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                         ("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                         ("position_ids", position_ids)):
        if tensor is not None and tensor.device != weight.device:
            raise ValueError(f"{name} is on {tensor.device} but the model is on {weight.device}; "
                             f"move the inputs with .to({str(weight.device)!r})")
    packing, packed = pack_inputs(base.config, input_ids, attention_mask, token_type_ids, position_ids,
                                  inputs_embeds)
    training = base.training
    hidden = embed(base.embeddings, packed["input_ids"], packed["position_ids"], packed["token_type_ids"],
                   packed["inputs_embeds"], training)
    if embeddings_require_grad and torch.is_grad_enabled():
        hidden.requires_grad_(True)
    rows = None
    if needed is not None and tuple(needed.shape) != (packing.batch, packing.seqlen):
        raise ValueError(f"labels has shape {tuple(needed.shape)}, expected {(packing.batch, packing.seqlen)}")
    if needed is not None and not output_hidden_states:
        keep = needed.bool()
        if pool_first_token:
            keep = keep | first_token_mask(packing, attention_mask)
        rows = kept_positions(packing.pack(keep))
    states = packed_encoder(base.encoder, hidden, packing, training, output_hidden_states, last_layer_rows=rows)
    return Encoded(packing, states[-1], states if output_hidden_states else None, None, rows)


class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings, layers, and (optionally) the [CLS] pooler."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def encode(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        needed: Tensor | None = None,
    ) -> Encoded:
        """Run the encoder on packed tokens and leave the result packed (heads use this directly).

        ``needed`` (batch, seq_len) bool marks the only positions whose output the caller will read
        (besides each row's first token, for the pooler): the last layer then computes just those.
        The pooler reads each row's first real token; an all-padding row pools zeros.
        """
        encoded = encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                         output_hidden_states, needed, pool_first_token=self.pooler is not None)
        if self.pooler is not None:
            first = encoded.row_of(encoded.packing.first_token_rows())
            encoded.pooled = self.pooler(gather_rows(encoded.hidden, first))
        return encoded

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """last_hidden_state (batch, seq_len, hidden), zeros at padding; pooler_output (batch, hidden)."""
        check_no_attentions(output_attentions)
        encoded = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                              bool(output_hidden_states))
        output = BaseModelOutputWithPooling(
            last_hidden_state=encoded.packing.unpack(encoded.hidden),
            pooler_output=encoded.pooled,
            hidden_states=encoded.padded_states(),
        )
        return self._finish(output, return_dict)


def check_no_attentions(output_attentions: bool | None) -> None:
    if output_attentions:
        raise ValueError(
            "output_attentions is not supported: bertfast's fused attention never materialises the "
            "attention probabilities"
        )
