"""Finding, validating, reading and writing checkpoints: the only checkpoint I/O in localglm."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from .errors import ModelFormatError

LFS_MAGIC = b"version https://git-lfs"
TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local directory, or a model id already in the Hugging Face cache (never downloads)."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ModelFormatError(f"{p} is a file; give the model directory that contains it")
    text = str(model)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from .hub import resolve_cached

        return resolve_cached(text)
    raise ModelFormatError(f"model directory {p} does not exist")


def is_lfs_pointer(path: Path) -> bool:
    try:
        if path.stat().st_size > 1024:
            return False
        with open(path, "rb") as f:
            return f.read(len(LFS_MAGIC)) == LFS_MAGIC
    except OSError:
        return False


def _lfs_error(files: list[Path]) -> ModelFormatError:
    names = ", ".join(f.name for f in files)
    what = "is a Git LFS pointer" if len(files) == 1 else "are Git LFS pointers"
    return ModelFormatError(
        f"{files[0].parent}: {names} {what}"
        " (a small text file), not the weights. Run `git lfs install && git lfs pull` in that "
        "directory, or download the files by hand from the model page."
    )


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files to read, safetensors preferred, each checked to exist and be real."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = model_dir / index_name
        if index.exists():
            files = _files_from_index(index)
            break
        files = sorted(model_dir.glob(pattern))
        if files:
            break
    else:
        raise ModelFormatError(
            f"{model_dir} has no weights (no *.safetensors or pytorch_model*.bin); is this a "
            "ChatGLM-6B model directory?"
        )
    missing = [f for f in files if not f.exists()]
    if missing:
        raise ModelFormatError(
            f"{model_dir}: shard(s) {', '.join(f.name for f in missing)} listed in the index "
            "are missing; the download is incomplete: fetch them again"
        )
    pointers = [f for f in files if is_lfs_pointer(f)]
    if pointers:
        raise _lfs_error(pointers)
    return files


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        if is_lfs_pointer(index):
            raise _lfs_error([index]) from None
        raise ModelFormatError(f"{index} is not a valid index (no weight_map)") from None
    return [index.parent / name for name in dict.fromkeys(weight_map.values())]


def read_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one checkpoint file, memory-mapped; pickles only with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
            return
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelFormatError(
            f"{path} cannot be read ({str(e).splitlines()[0][:200]}); the file is probably "
            "truncated or corrupted: download it again"
        ) from None
    except Exception as e:  # pickle.UnpicklingError for non-tensor pickles
        raise ModelFormatError(
            f"{path} is not a plain tensor checkpoint and is not loaded for safety ({e})"
        ) from None
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path} does not hold a state dict")
    yield from state.items()


def iter_checkpoint(model_dir: Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(model_dir)
    bar = None
    if progress and len(files) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="loading shards", unit="shard", leave=False)
    for f in files:
        yield from read_file(f)
        if bar:
            bar.update()
    if bar:
        bar.close()


def load_into(
    module: torch.nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    convert: Callable[[str, torch.Tensor], torch.Tensor],
    source: str,
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """Assign checkpoint tensors to ``module`` (built on the meta device), one at a time.

    ``convert(name, tensor)`` turns each checkpoint tensor into its final dtype/device/format.
    Every missing, unexpected or wrong-shaped tensor is collected and reported in one error.
    """
    expected = module.state_dict(keep_vars=True)  # persistent parameters and buffers
    seen, unexpected, bad_shape = set(), [], []
    for name, t in tensors:
        if name not in expected:
            if not ignore(name):
                unexpected.append(name)
            continue
        if tuple(t.shape) != tuple(expected[name].shape):
            bad_shape.append(f"{name}: file {tuple(t.shape)}, model {tuple(expected[name].shape)}")
            continue
        assign(module, name, convert(name, t))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    if bad_shape:
        problems.append(f"wrong shapes: {_short(bad_shape)}")
    if problems:
        raise ModelFormatError(
            f"{source} does not match its config.json: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights, or download them again."
        )


def _short(items: list[str], n: int = 6) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def assign(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer ``name`` of ``module`` (e.g. on the meta device)."""
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def save_model_dir(out_dir: Path, state: dict[str, torch.Tensor], config: dict,
                   copy_from: Path | None = None, max_shard_bytes: int = 2 << 30) -> None:
    """Write safetensors shards + config.json (+ tokenizer files) atomically: temp dir, rename."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelFormatError(f"{out_dir} exists and is not empty; choose a new output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous()
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else \
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        if copy_from is not None:
            for name in TOKENIZER_FILES:
                if (copy_from / name).exists():
                    shutil.copy2(copy_from / name, tmp / name)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes a private directory
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
