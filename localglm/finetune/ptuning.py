"""P-Tuning v2: a trainable prefix encoder, saved in the official ptuning checkpoint format.

The official ptuning/main.py saves ``config.json`` (the model config with ``pre_seq_len`` and
``prefix_projection``) and ``pytorch_model.bin`` holding only ``transformer.prefix_encoder.*``
in float32; ``localglm.load(model, ptuning=DIR)`` and the official code both read that.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import LocalGLMError
from ..model import ChatGLMModel, PrefixEncoder
from .lora import _atomic

PREFIX = "transformer.prefix_encoder."
OFFICIAL_DROPOUT = 0.1  # the official model applies this dropout to the prefix when training


def add_prefix_encoder(model: ChatGLMModel, pre_seq_len: int, projection: bool = False,
                       hidden: int | None = None) -> PrefixEncoder:
    """Give ``model`` a fresh float32 prefix encoder; freeze everything else.

    Initialisation is nn.Embedding's default N(0, 1), as in the official training (its
    ``_init_weights`` leaves the new prefix encoder untouched).
    """
    if pre_seq_len < 1:
        raise LocalGLMError(f"--pre-seq-len must be >= 1, not {pre_seq_len}")
    if model.transformer.prefix_encoder is not None:
        raise LocalGLMError("this model already has a P-Tuning prefix")
    cfg = model.config
    cfg.pre_seq_len, cfg.prefix_projection = pre_seq_len, projection
    cfg.prefix_hidden_size = hidden
    device = model.transformer.word_embeddings.weight.device
    for p in model.parameters():
        p.requires_grad_(False)
    enc = PrefixEncoder(cfg).to(device=device, dtype=torch.float32)
    model.transformer.prefix_encoder = enc
    return enc


def prefix_state_dict(model: ChatGLMModel) -> dict[str, torch.Tensor]:
    enc = model.transformer.prefix_encoder
    if enc is None:
        raise LocalGLMError("the model has no P-Tuning prefix encoder")
    return {PREFIX + k: v.detach().float().cpu().contiguous() for k, v in enc.state_dict().items()}


def ptuning_config(model: ChatGLMModel) -> dict:
    """The base model's config with the prefix settings, as the official trainer saves it."""
    cfg = model.config.to_dict()
    cfg.update(pre_seq_len=model.config.pre_seq_len,
               prefix_projection=bool(model.config.prefix_projection))
    if not cfg.get("prefix_hidden_size"):
        cfg.pop("prefix_hidden_size", None)
    return cfg


def save_ptuning(model: ChatGLMModel, out_dir) -> Path:
    """Write config.json + pytorch_model.bin (official) + model.safetensors (same tensors)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = prefix_state_dict(model)
    _atomic(out_dir / "pytorch_model.bin", lambda p: torch.save(state, p))
    _atomic(out_dir / "model.safetensors",
            lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    text = json.dumps(ptuning_config(model), indent=2, ensure_ascii=False)
    _atomic(out_dir / "config.json", lambda p: p.write_text(text, encoding="utf-8"))
    return out_dir


def load_prefix_into(model: ChatGLMModel, ckpt_dir) -> None:
    """Copy a saved prefix (this module's format) into the model's prefix encoder (resume)."""
    from .. import weights

    enc = model.transformer.prefix_encoder
    state = {k.removeprefix(PREFIX): v for k, v in weights.iter_checkpoint(Path(ckpt_dir))
             if k.startswith(PREFIX)}
    with torch.no_grad():
        for k, v in enc.state_dict(keep_vars=True).items():
            if k not in state or state[k].shape != v.shape:
                raise LocalGLMError(f"{ckpt_dir} does not hold a matching {PREFIX}{k}")
            v.copy_(state[k])
