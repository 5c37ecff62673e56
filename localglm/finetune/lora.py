"""LoRA adapters on the block linears, saved and loaded in PEFT's file layout.

An adapter directory is what ``peft`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``adapter_model.bin``) with keys such as
``base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight``. Module names
are the official ones, so adapters trained with PEFT on the official model load here and the
other way round.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import LocalGLMError, ModelFormatError

DEFAULT_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
SAFE_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


class LoRALinear(nn.Module):
    """``base(x) + B(A(dropout(x))) * scaling``, with ``scaling = alpha / r``.

    The base is a frozen callable (an ``nn.Linear`` or a weight-only quantized linear): it is
    only called, never read, so gradients reach A and B through frozen, even integer, weights.
    B starts at zero, so a fresh adapter leaves the model's outputs unchanged. A and B are kept
    in float32 whatever the base's dtype; their output is cast to the base output's dtype.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int,
                 alpha: float, dropout: float = 0.0, scaling: float | None = None):
        super().__init__()
        if r < 1:
            raise LocalGLMError(f"LoRA rank must be >= 1, not {r}")
        if not 0 <= dropout < 1:
            raise LocalGLMError(f"LoRA dropout must be in [0, 1), not {dropout}")
        self.base_layer = base
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r if scaling is None else scaling
        device = _device_of(base)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        out = self.base_layer(x)
        if self.merged:
            return out
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        delta = self.lora_B(self.lora_A(h)) * self.scaling
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``scaling * B @ A``, (out, in) float32."""
        return (self.lora_B.weight @ self.lora_A.weight).detach() * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into a float base's weight (then the forward is the base alone)."""
        if self.merged:
            return
        w = _float_weight(self.base_layer)
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = _float_weight(self.base_layer)
        w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False

    def fuse(self) -> nn.Module:
        """Merge and return the base module, to put in this wrapper's place."""
        self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _float_weight(base: nn.Module) -> torch.Tensor:
    w = getattr(base, "weight", None)
    if not isinstance(base, nn.Linear) or w is None or not w.is_floating_point():
        raise LocalGLMError(
            f"cannot merge a LoRA adapter into a {type(base).__name__}: merging needs float "
            "weights; load the model in float16/bfloat16/float32 first")
    return w


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _features(module: nn.Module, leaf: str, cfg) -> tuple[int, int]:
    """(in, out) of a target module: its own attributes, else the config's shapes."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if cfg is not None:
        h, inner = cfg.hidden_size, cfg.inner_hidden_size
        table = {"query_key_value": (h, 3 * h), "dense": (h, h),
                 "dense_h_to_4h": (h, inner), "dense_4h_to_h": (inner, h)}
        if leaf in table:
            return table[leaf]
    raise LocalGLMError(f"cannot tell the input/output sizes of {leaf} ({type(module).__name__})")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Name (official module path) -> LoRA wrapper, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets=DEFAULT_TARGETS, r: int = 8, alpha: float = 16,
               dropout: float = 0.0) -> list[str]:
    """Wrap every block linear whose name ends with one of ``targets``; freeze everything else.

    Returns the wrapped module names. Matching is on the last name component, as PEFT does
    with a list of names (so "dense" is the attention output, not dense_h_to_4h).
    """
    if lora_modules(model):
        raise LocalGLMError("this model already has LoRA layers")
    if r < 1:
        raise LocalGLMError(f"LoRA rank must be >= 1, not {r}")
    targets = set(targets)
    cfg = getattr(model, "config", None)
    names = [n for n, _ in model.named_modules()
             if n.rpartition(".")[2] in targets and ".layers." in f".{n}"]
    unmatched = targets - {n.rpartition(".")[2] for n in names}
    if unmatched:
        raise LocalGLMError(
            f"no block module is named {', '.join(sorted(unmatched))}; LoRA targets are among "
            f"{', '.join(DEFAULT_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        fin, fout = _features(base, name.rpartition(".")[2], cfg)
        _set_submodule(model, name, LoRALinear(base, fin, fout, r, alpha, dropout))
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values()
            for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's saved key names (no adapter name), on CPU."""
    out = {}
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = w.detach().cpu().contiguous()
    return out


def adapter_config(model: nn.Module, base_model: str = "", **overrides) -> dict:
    """``adapter_config.json`` contents in PEFT's LoraConfig fields."""
    mods = lora_modules(model)
    if not mods:
        raise LocalGLMError("the model has no LoRA layers")
    first = next(iter(mods.values()))
    drop = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    targets = sorted({n.rpartition(".")[2] for n in mods})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r,
        "lora_alpha": first.alpha, "lora_dropout": drop, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": base_model,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "revision": None,
    }
    cfg.update(overrides)
    return cfg


def save_adapter(model: nn.Module, out_dir, config: dict | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (each file atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(model, **(config or {}))
    _atomic(out_dir / SAFE_NAME,
            lambda p: save_file(lora_state_dict(model), str(p), metadata={"format": "pt"}))
    text = json.dumps(cfg, indent=2, ensure_ascii=False)
    _atomic(out_dir / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return out_dir


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise ModelFormatError(f"adapter {adapter_dir} is not a directory")
    if not path.exists():
        raise ModelFormatError(f"{adapter_dir} has no {CONFIG_NAME}; is it a LoRA adapter?")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelFormatError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise ModelFormatError(f"{path}: DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise ModelFormatError(f"{path}: bias {cfg['bias']!r} adapters are not supported")
    return cfg


_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def read_adapter_tensors(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> {"A": (r, in), "B": (out, r)}; accepts PEFT's key variants.

    ``base_model.model.`` prefix present or not, adapter name (``.default``) present or not.
    """
    from .. import weights

    files = [adapter_dir / n for n in (SAFE_NAME, BIN_NAME) if (adapter_dir / n).exists()]
    if not files:
        raise ModelFormatError(f"{adapter_dir} has neither {SAFE_NAME} nor {BIN_NAME}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    names = set()
    for key, t in weights.read_file(files[0]):
        m = _KEY.match(key.removeprefix(PEFT_PREFIX))
        if m is None:
            raise ModelFormatError(f"{files[0]}: unexpected tensor {key} in a LoRA adapter")
        names.add(m["adapter"])
        out.setdefault(m["module"], {})[m["part"]] = t
    if len(names) > 1:
        raise ModelFormatError(f"{files[0]} holds several adapters ({sorted(map(str, names))})")
    broken = [k for k, v in out.items() if len(v) != 2]
    if broken or not out:
        raise ModelFormatError(f"{files[0]}: incomplete LoRA pairs for {broken or 'any module'}")
    return out


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank/alpha_pattern: a key applies when it matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def load_adapter(model: nn.Module, adapter_dir, merge: bool = False) -> None:
    """Add a saved LoRA adapter to ``model`` in place.

    Unmerged (default), the adapter stays a separate low-rank path: exact, and it works on
    quantized bases. ``merge=True`` folds it into every float base weight (no cost at inference)
    and keeps it separate only where the base is quantized. Everything is checked before the
    model is changed.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    modules = dict(model.named_modules())
    unknown = [n for n in tensors if n not in modules]
    if unknown:
        raise ModelFormatError(
            f"{adapter_dir}: the model has no module(s) {', '.join(unknown[:4])}; was the adapter "
            "trained on ChatGLM-6B?")
    wrappers = {name: _loaded_wrapper(model, name, modules[name], pair, cfg, adapter_dir)
                for name, pair in tensors.items()}
    for name, wrapper in wrappers.items():
        floating = isinstance(wrapper.base_layer, nn.Linear)
        _set_submodule(model, name, wrapper.fuse() if merge and floating else wrapper)


def _loaded_wrapper(model, name, base, pair, cfg, adapter_dir) -> LoRALinear:
    if isinstance(base, LoRALinear):
        raise LocalGLMError(f"{name} already has a LoRA adapter")
    fin, fout = _features(base, name.rpartition(".")[2], getattr(model, "config", None))
    a, b = pair["A"], pair["B"]
    r = a.shape[0]
    if a.shape != (r, fin) or b.shape != (fout, r):
        raise ModelFormatError(
            f"{adapter_dir}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
            f"this model needs ({r}, {fin}) and ({fout}, {r})")
    alpha = _pattern(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", r))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    wrapper = LoRALinear(base, fin, fout, r, alpha, scaling=scaling)
    with torch.no_grad():
        wrapper.lora_A.weight.copy_(a.float())
        wrapper.lora_B.weight.copy_(b.float())
    wrapper.requires_grad_(False)
    return wrapper


def merge_adapter(model: nn.Module) -> int:
    """Merge every LoRA layer into its float base and drop the wrappers; returns the count."""
    mods = lora_modules(model)
    for m in mods.values():
        _float_weight(m.base_layer)  # all or nothing: check every base before changing one
    for name, m in mods.items():
        _set_submodule(model, name, m.fuse())
    return len(mods)
