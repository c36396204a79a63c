"""BertConfig: the same fields, defaults and ``config.json`` format as transformers' BertConfig."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bertfast.io import CheckpointError, atomic_write_text

CONFIG_NAME = "config.json"

# hidden_act values and the GELU form each one means.
GELU_APPROXIMATION = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}

# (layers, hidden, heads) of the standard BERT sizes; intermediate is 4 * hidden.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    problem_type: str | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    num_labels: int = 2
    architectures: list[str] | None = None
    # Keys of a config.json that bertfast does not use, kept so that saving round-trips them.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in GELU_APPROXIMATION:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(GELU_APPROXIMATION)}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")

    def __getattr__(self, name: str) -> Any:
        # Keys of config.json that bertfast does not model (kept in ``extra``) read like fields, as
        # transformers' configs do; dataclass fields never reach this.
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # The parts of transformers' PreTrainedConfig API that Trainer, pipelines and PEFT call.
    model_type = "bert"
    is_encoder_decoder = False

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> BertConfig:
        return self

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def use_return_dict(self) -> bool:
        return True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        return GELU_APPROXIMATION[self.hidden_act]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BertConfig:
        """A config of a standard size: tiny, mini, small, medium, base or large."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        layers, hidden, heads = PRESETS[name]
        values = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      intermediate_size=4 * hidden)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BertConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in values.items() if k not in known and k != "extra"}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        extra = values.pop("extra")
        values["id2label"] = {str(k): v for k, v in self.id2label.items()}
        values["model_type"] = "bert"
        values["position_embedding_type"] = "absolute"
        for key, value in extra.items():
            values.setdefault(key, value)
        if values["architectures"] is None:
            del values["architectures"]
        return values

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> BertConfig:
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no {CONFIG_NAME} found at {path}")
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} is not valid JSON ({e}); the file is corrupt or truncated") from e
        if not isinstance(values, dict):
            raise CheckpointError(f"{file} must hold a JSON object, got {type(values).__name__}")
        model_type = values.get("model_type", "bert")
        if model_type != "bert":
            raise CheckpointError(f"{file} describes a {model_type!r} model, not a BERT")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{file} is not a valid BERT config: {e}") from e

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / CONFIG_NAME, self.to_json_string())
