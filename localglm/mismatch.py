"""Explaining a config.json / weights mismatch: which config field is wrong, which tensors differ.

Pure functions over ``{name: shape}`` dicts, so the checker (headers only) and the loader
(tensors as they stream in) report a mismatch with the same lines.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

from .config import ModelConfig

Shapes = dict[str, tuple[int, ...]]

_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_EMBEDDING = "transformer.word_embeddings.weight"
_MLP_IN = "transformer.layers.0.mlp.dense_h_to_4h.weight"
_QKV = "transformer.layers.0.attention.query_key_value.weight"
_INV_FREQ = "transformer.layers.0.attention.rotary_emb.inv_freq"


def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _field_line(field: str, ours, theirs, name: str, shape: tuple[int, ...], why: str = "") -> str:
    return (f"config.json {field}={ours} but the weights have {theirs} ({name} is "
            f"{_dims(shape)}{why}): set {field} to {theirs}, or use the config.json that came "
            "with these weights")


def config_field_lines(cfg: ModelConfig, found: Shapes) -> list[str]:
    """One line per config.json field whose value disagrees with what the weights imply."""
    lines = []
    emb = found.get(_EMBEDDING)
    hidden = cfg.hidden_size
    if emb is not None and len(emb) == 2:
        hidden = emb[1]
        if emb[0] != cfg.vocab_size:
            lines.append(_field_line("vocab_size", cfg.vocab_size, emb[0], _EMBEDDING, emb))
        if emb[1] != cfg.hidden_size:
            lines.append(_field_line("hidden_size", cfg.hidden_size, emb[1], _EMBEDDING, emb))
    layers = sorted({int(m.group(1)) for n in found if (m := _LAYER.match(n))})
    if layers and layers[-1] + 1 != cfg.num_layers:
        lines.append(f"config.json num_layers={cfg.num_layers} but the weights have "
                     f"{layers[-1] + 1} (transformer.layers.{layers[0]}-{layers[-1]}): set "
                     f"num_layers to {layers[-1] + 1}, or use the config.json that came with "
                     "these weights")
    mlp = found.get(_MLP_IN)
    if mlp is not None and len(mlp) == 2 and mlp[0] != cfg.inner_hidden_size:
        lines.append(_field_line("inner_hidden_size", cfg.inner_hidden_size, mlp[0], _MLP_IN,
                                 mlp))
    inv = found.get(_INV_FREQ)
    if inv is not None and len(inv) == 1 and inv[0]:
        # The rotary table covers head_dim / 2 (2-D positions) in steps of 2.
        head_dim = inv[0] * (4 if cfg.position_encoding_2d else 2)
        if hidden % head_dim == 0 and hidden // head_dim != cfg.num_attention_heads:
            lines.append(_field_line("num_attention_heads", cfg.num_attention_heads,
                                     hidden // head_dim, _INV_FREQ, inv,
                                     f", so head_dim is {head_dim}"))
    line = _quantization_line(cfg, found, hidden)
    return lines + ([line] if line else [])


def _quantization_line(cfg: ModelConfig, found: Shapes, hidden: int) -> str | None:
    scale = _QKV + "_scale"
    if not any(n.endswith(".weight_scale") for n in found):
        if cfg.quantization_bit:
            return (f"config.json quantization_bit={cfg.quantization_bit} but the weights are "
                    "not quantized (no *.weight_scale tensors): remove quantization_bit, or use "
                    "the config.json that came with these weights")
        return None
    qkv = found.get(_QKV)
    bits = None
    if qkv is not None and len(qkv) == 2 and scale in found:
        bits = {hidden: 8, hidden // 2: 4}.get(qkv[1])
    if not cfg.quantization_bit:
        what = f"int{bits}" if bits else "quantized"
        return (f"config.json has no quantization_bit but the weights are {what} ({scale} "
                "exists): use the config.json that came with these weights")
    if bits and bits != cfg.quantization_bit:
        return _field_line("quantization_bit", cfg.quantization_bit, bits, _QKV, qkv,
                           f" for hidden_size {hidden}")
    return None


def tensor_lines(expected: Shapes, found: Shapes, num_layers: int,
                 ignore: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Missing, unexpected and wrong-shaped tensors; each tensor in exactly one line, and the
    per-layer ones grouped ("in all 28 layers: ...") instead of listed layer by layer.
    ``ignore``: names that may be in the file without the model expecting them."""
    missing = {n: "" for n in expected if n not in found}
    unexpected = {n: "" for n in found if n not in expected and not ignore(n)}
    wrong = {n: f" {_dims(found[n])} vs {_dims(expected[n])}" for n in found
             if n in expected and tuple(found[n]) != tuple(expected[n])}
    return (_grouped("missing", missing, num_layers)
            + _grouped("unexpected", unexpected, num_layers)
            + _grouped("wrong shape (weights vs config.json)", wrong, num_layers))


def _grouped(kind: str, items: dict[str, str], num_layers: int) -> list[str]:
    layers_of: dict[str, set[int]] = defaultdict(set)  # "suffix detail" -> layers
    others = []
    for name in sorted(items):
        m = _LAYER.match(name)
        if m:
            layers_of[m.group(2) + items[name]].add(int(m.group(1)))
        else:
            others.append(name + items[name])
    by_layers: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for text, layers in layers_of.items():
        by_layers[tuple(sorted(layers))].append(text)
    lines = [f"{kind} in {_layers(layers, num_layers)}: {_short(texts)}"
             for layers, texts in by_layers.items()]
    if others:
        lines.append(f"{kind}: {_short(others)}")
    return lines


def _layers(layers: tuple[int, ...], num_layers: int) -> str:
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == tuple(range(num_layers)):
        return f"all {num_layers} layers"
    if layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{len(layers)} layers ({layers[0]}-{layers[-1]})"
    return f"{len(layers)} layers ({_short([str(i) for i in layers])})"


def _short(items: list[str], n: int = 4) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def mismatch_lines(cfg: ModelConfig, expected: Shapes, found: Shapes,
                   ignore: Callable[[str], bool] = lambda name: False) -> list[str]:
    """The config fields that disagree with the weights, then the tensors that differ."""
    return config_field_lines(cfg, found) + tensor_lines(expected, found, cfg.num_layers, ignore)
