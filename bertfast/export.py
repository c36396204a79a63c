"""An accelerated model as one ahead-of-time compiled package (``.pt2``) that runs without bertfast's model code.

    bertfast.export.export(model, "model.pt2")           # torch.export + AOTInductor
    runner = bertfast.export.load("model.pt2")            # torch + bertfast's op library, nothing else
    outputs = runner(input_ids, attention_mask, token_type_ids)   # {"last_hidden_state": ..., ...}

The model's own eval forward (bertfast's packed, unpadded encoder) is traced by ``torch.export`` with the
batch size and the sequence length dynamic (``torch.export.Dim``), so one package takes ragged batches of any
shape up to ``max_tokens`` per sequence. Packing stays inside the graph: the data-dependent token count
comes from ``torch.nonzero``, which AOTInductor compiles natively (bertfast's own ``kept_positions`` op,
a Python custom op, is decomposed into it). AOTInductor compiles the graph, with the weights frozen into
constants, into a shared library (gcc, for the CPU this runs on) and packs it with the weights into one file.

The native CPU kernels (``bertfast::attention``, ``add_layernorm``, ``bias_gelu``) are C++ ``TORCH_LIBRARY``
ops of ``bertfast/_C.so``; the package calls them through the dispatcher, so the process that runs it must
have loaded that library (``torch.ops.load_library``; :func:`load` does it). Without the built library the
export runs on the reference ops, which Inductor compiles into the package, and the package needs only torch.

What can be exported (anything else is refused by name): bertfast's ``BertModel`` and
``BertForSequenceClassification``, and transformers' ``BertModel``, ``RobertaModel``, ``XLMRobertaModel``,
``CamembertModel`` and their ``...ForSequenceClassification`` once ``bertfast.accelerate`` has run them on
bertfast's encoder.

This module imports only torch at import time, so :func:`load` pulls in none of bertfast's model code.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Keys of the package's metadata (AOTInductor stores a str -> str map in the package).
TASK_KEY, OUTPUTS_KEY, MAX_TOKENS_KEY = "bertfast.task", "bertfast.outputs", "bertfast.max_tokens"
TASKS = {"feature-extraction": "BertModel, RobertaModel, XLMRobertaModel, CamembertModel",
         "sequence-classification": "their ...ForSequenceClassification"}


class ExportError(ValueError):
    """The model or an option cannot be exported; the message names which and why."""


def op_library_path() -> str | None:
    """The path of bertfast's native op library (``bertfast/_C.so``), or None when it is not built (or built
    for another torch, which ``bertfast.ops`` would not load either)."""
    spec = importlib.util.find_spec("bertfast._C")
    if spec is None or spec.origin is None:
        return None
    built_for = Path(spec.origin).with_name("_C.torch-version")
    if built_for.is_file() and built_for.read_text().strip() != torch.__version__:
        return None
    return spec.origin


# ------------------------------------------------------------------------------------------ what is exported


class _Exported(nn.Module):
    """The exported signature: (input_ids, attention_mask, token_type_ids) -> a tuple of named outputs."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor, ...]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return tuple(getattr(out, name) for name in self.outputs)


def _transformers_base(model: nn.Module) -> tuple[nn.Module, object] | None:
    """(base model, its bertfast family) of a transformers model of a BERT-tree family, or None.

    Families with their own encoder module (DistilBERT, ELECTRA, ALBERT, MPNet, ...) are not exported."""
    from bertfast.dropin import _family_base

    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module):
        return None
    found = _family_base(base)
    if found is None or found[1].encoder is not None:
        return None
    return base, found[1]


def describe(model: nn.Module) -> tuple[str, tuple[str, ...], int]:
    """(task, output names, the longest sequence its positions allow) of an exportable model; refuses the rest."""
    from bertfast.dropin import is_accelerated
    from bertfast.models import BertForSequenceClassification, BertModel, BertPreTrainedModel

    name = type(model).__name__
    supported = "; ".join(f"{task}: {classes}" for task, classes in TASKS.items())
    if isinstance(model, BertPreTrainedModel):
        if type(model) is BertModel:
            base, task = model, "feature-extraction"
        elif type(model) is BertForSequenceClassification:
            base, task = model.bert, "sequence-classification"
        else:
            raise ExportError(f"bertfast.export: {name} is not supported; supported: {supported}")
        longest = model.config.max_position_embeddings
    else:
        found = _transformers_base(model)
        is_classifier = name.endswith("ForSequenceClassification")
        if found is None or not (found[0] is model or is_classifier):
            raise ExportError(f"bertfast.export: {name} is not supported; supported: {supported} "
                              "(bertfast's classes, or transformers' after bertfast.accelerate)")
        base, family = found
        if not is_accelerated(base):
            raise ExportError(f"bertfast.export: {name} runs transformers' own forward; call "
                              "bertfast.accelerate(model) first, so that the package holds bertfast's encoder")
        task = "feature-extraction" if base is model else "sequence-classification"
        offset = base.config.pad_token_id + 1 if family.positions_after_padding else 0
        longest = base.config.max_position_embeddings - offset
    if task == "feature-extraction":
        outputs = ("last_hidden_state",) + (("pooler_output",) if base.pooler is not None else ())
    else:
        outputs = ("logits",)
    return task, outputs, longest


def _kept_positions(keep: Tensor) -> Tensor:
    return torch.nonzero(keep.flatten()).flatten()


def _example_inputs(vocab_size: int, max_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """A ragged batch to trace with: 3 rows of up to 4 tokens (no size 1, which export would specialise)."""
    seqlen = min(max_tokens, 4)
    ids = torch.randint(0, vocab_size, (3, seqlen))
    mask = torch.ones_like(ids)
    mask[1, seqlen // 2:] = 0
    return ids, mask, torch.zeros_like(ids)


def export(model: nn.Module, path: str | os.PathLike, *, precision: str = "fp32",
           max_tokens: int | None = None) -> Path:
    """Compile ``model``'s inference forward into the AOTInductor package ``path`` (``.pt2``); returns its path.

    The package takes ``(input_ids, attention_mask, token_type_ids)``, int64 tensors of one (batch, seq_len)
    shape, any batch size and 1 <= seq_len <= ``max_tokens`` (default: what the model's positions allow),
    and returns the outputs named in its metadata (:func:`load` returns them by name): ``last_hidden_state``
    (zeros at padding) and ``pooler_output`` for a base model, ``logits`` for a classifier. ``precision``
    "bf16" exports a bfloat16 copy (weights and activations; needs AVX512-BF16 or AMX). ``model`` itself is
    not changed. Token ids are not range-checked beyond what the compiled lookup asserts.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not isinstance(model, nn.Module):
        raise ExportError(f"bertfast.export takes a torch.nn.Module, got {type(model).__name__}")
    task, outputs, longest = describe(model)
    if max_tokens is None:
        max_tokens = longest
    if not isinstance(max_tokens, int) or not 2 <= max_tokens <= longest:
        raise ExportError(f"max_tokens must be an integer from 2 to {longest} (the model's positions), "
                          f"got {max_tokens!r}")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ExportError(f"the package's file name must end in .pt2, got {str(path)!r}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ExportError("bertfast.export compiles for the CPU; move the model there with model.cpu() first")
    if precision == "bf16":
        from bertfast.inference import check_cpu_supports

        try:
            check_cpu_supports("bf16")
        except RuntimeError as e:
            raise ExportError(str(e)) from e
    traced = copy.deepcopy(model).eval().to(torch.bfloat16 if precision == "bf16" else torch.float32)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq_len", min=1, max=max_tokens)
    dynamic = {name: {0: batch, 1: seq} for name in INPUTS}
    with torch.no_grad():
        program = torch.export.export(_Exported(traced, outputs), _example_inputs(traced.config.vocab_size, max_tokens),
                                      dynamic_shapes=dynamic)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    if "bertfast.kept_positions.default" not in targets:  # the call ran some other forward than bertfast's
        raise ExportError(f"bertfast.export: {type(model).__name__}'s forward did not run bertfast's packed encoder")
    program = program.run_decompositions({torch.ops.bertfast.kept_positions.default: _kept_positions})
    metadata = {TASK_KEY: task, OUTPUTS_KEY: ",".join(outputs), MAX_TOKENS_KEY: str(max_tokens)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.pt2")
    try:
        # Freezing makes the weights constants of the graph, so the work done on them alone (the fused q/k/v
        # weight's concatenation) happens once, at compile time: 1.1-1.25x faster on MiniLM-L6 than without.
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial),
                                                 inductor_configs={"aot_inductor.metadata": metadata,
                                                                   "freezing": True})
        os.replace(partial, path)  # atomic: a reader never sees half a package
    finally:
        partial.unlink(missing_ok=True)
    return path


def export_checkpoint(directory: str | os.PathLike, path: str | os.PathLike, *, precision: str = "fp32",
                      max_tokens: int | None = None) -> Path:
    """:func:`export` of a BERT checkpoint directory (what ``bertfast export`` runs).

    A ``BertForSequenceClassification`` checkpoint (its config's ``architectures``) exports the classifier;
    any other BERT checkpoint (a base model, a pretraining or MLM checkpoint) exports its encoder, BertModel.
    """
    from bertfast.config import BertConfig
    from bertfast.models import BertForSequenceClassification, BertModel

    config = BertConfig.from_pretrained(directory)
    classifier = "BertForSequenceClassification" in (config.architectures or ())
    cls = BertForSequenceClassification if classifier else BertModel
    model, info = cls.from_pretrained(directory, config=config, output_loading_info=True)
    if info["missing_keys"]:  # a freshly initialised weight would make the package's outputs meaningless
        raise ExportError(f"{directory} lacks weights of {cls.__name__}: {', '.join(info['missing_keys'])}")
    return export(model, path, precision=precision, max_tokens=max_tokens)


# ------------------------------------------------------------------------------------------ running a package


class ExportedModel:
    """A loaded package: ``runner(input_ids, attention_mask, token_type_ids=None)`` -> {output name: tensor}."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no package at {str(self.path)!r}")
        try:
            self.package = torch._inductor.aoti_load_package(str(self.path))
        except RuntimeError as e:
            if op_library_path() is not None:
                raise
            raise RuntimeError(f"cannot load {str(self.path)!r}: {str(e).splitlines()[0] if str(e) else e}; a "
                               "package exported with bertfast's native ops needs bertfast/_C.so built for this "
                               f"torch ({torch.__version__}): reinstall bertfast") from e
        metadata = self.package.get_metadata()
        if OUTPUTS_KEY not in metadata:
            raise ValueError(f"{str(self.path)!r} is not a package written by bertfast.export")
        self.task = metadata[TASK_KEY]
        self.outputs = tuple(metadata[OUTPUTS_KEY].split(","))
        self.max_tokens = int(metadata[MAX_TOKENS_KEY])

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
                 ) -> dict[str, Tensor]:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        for name, tensor in zip(INPUTS, (input_ids, attention_mask, token_type_ids), strict=True):
            if tensor.dim() != 2 or tensor.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; the inputs must be (batch, seq_len) "
                                 f"tensors of one shape, here {tuple(input_ids.shape)}")
        if not 1 <= input_ids.shape[1] <= self.max_tokens:
            raise ValueError(f"seq_len is {input_ids.shape[1]}; this package takes 1 to {self.max_tokens} tokens "
                             "(export it again with a larger max_tokens)")
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        values = self.package(input_ids.long(), attention_mask.long(), token_type_ids.long())
        return dict(zip(self.outputs, values, strict=True))


def load(path: str | os.PathLike) -> ExportedModel:
    """Load a package written by :func:`export`: bertfast's op library if the package calls its ops, then the
    package itself. Imports nothing of bertfast but this module."""
    library = op_library_path()
    if library is not None:
        torch.ops.load_library(library)
    return ExportedModel(path)
