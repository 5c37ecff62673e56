"""Model configuration read from the official ChatGLM-6B ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFormatError

_REQUIRED = (
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "mask_token_id",
    "gmask_token_id",
    "max_sequence_length",
)


@dataclass
class ModelConfig:
    hidden_size: int = 4096  # width of the residual stream
    num_layers: int = 28  # number of GLM blocks
    num_attention_heads: int = 32  # head_dim = hidden_size // num_attention_heads
    vocab_size: int = 130528  # rows of the (tied) embedding; may exceed the tokenizer's size
    inner_hidden_size: int | None = None  # MLP width; official default 4 * hidden_size
    bos_token_id: int = 130004  # <sop>: starts the answer, ends the bidirectional context
    eos_token_id: int = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int = 3  # <pad>
    max_sequence_length: int = 2048  # positions the model was trained for
    position_encoding_2d: bool = True  # ChatGLM-6B always uses 2-D rotary positions
    layernorm_epsilon: float = 1e-5
    # Quantization of the block linears: 0 = none, 4 or 8 = weight-only integer weights.
    quantization_bit: int = 0
    # "official": THUDM's packed int8/int4 with per-row scales; "localglm": group-wise layout
    # written by `localglm quantize`.
    quantization_format: str = "official"
    quantization_group_size: int = 0  # 0 = one scale per output row
    quantization_embeddings: bool = False
    # 8: the tied embedding / output head is stored as int8 with one scale per row
    # (localglm's converted int8/int4 models); 0: float.
    quantization_head_bits: int = 0
    # P-Tuning v2: number of learned prefix key/value positions per layer (None = off).
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None
    torch_dtype: str = "float16"
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, kept for saving

    def __post_init__(self):
        if self.inner_hidden_size is None:
            self.inner_hidden_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.quantization_bit not in (0, 4, 8):
            raise ValueError(f"quantization_bit must be 0, 4 or 8, not {self.quantization_bit}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if known.get("pre_seq_len") in (0,):
            known["pre_seq_len"] = None
        return cls(**known, extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelFormatError(
                f"{path.parent} has no config.json; point localglm at a ChatGLM-6B model "
                "directory (the one holding config.json, ice_text.model and the weights)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ModelFormatError(f"{path} must hold a JSON object")
        model_type = d.get("model_type")
        if model_type != "chatglm":
            raise ModelFormatError(
                f"{path}: model_type is {model_type!r}; localglm runs ChatGLM-6B "
                "(model_type 'chatglm')"
            )
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ModelFormatError(f"{path}: missing field(s) {', '.join(missing)}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ModelFormatError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        d["model_type"] = "chatglm"
        return d
