"""Finding, validating, reading and writing checkpoints: the only checkpoint I/O in localglm."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from .config import ModelConfig
from .errors import LocalGLMError, ModelFormatError
from .mismatch import mismatch_lines, tensor_lines

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


def _lfs_problem(path: Path) -> str:
    return (f"{path.name} is a Git LFS pointer (a small text file), not the real file: run "
            "`git lfs install && git lfs pull` in the model directory")


def _weight_files(model_dir: Path) -> tuple[list[Path], list[str]]:
    """The weight files to read (safetensors preferred) and the problems of the file list."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = model_dir / index_name
        if index.exists():
            return _files_from_index(index)
        files = sorted(model_dir.glob(pattern))
        if files:
            return files, []
    return [], [f"{model_dir} has no weights (no *.safetensors or pytorch_model*.bin); is this "
                "a ChatGLM-6B model directory?"]


def _files_from_index(index: Path) -> tuple[list[Path], list[str]]:
    if is_lfs_pointer(index):
        return [], [_lfs_problem(index)]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            UnicodeDecodeError):
        return [], [f"{index.name} is not a valid index (no weight_map): download it again"]
    files = [index.parent / name for name in names]
    missing = [f.name for f in files if not f.exists()]
    problems = [f"{name} is listed in {index.name} but missing: the download is incomplete, "
                "fetch it again" for name in missing]
    return [f for f in files if f.exists()], problems


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files to read, safetensors preferred, each checked to exist and be real."""
    files, problems = _weight_files(model_dir)
    problems += [_lfs_problem(f) for f in files if is_lfs_pointer(f)]
    if problems:
        raise problems_error(model_dir, problems)
    return files


def problems_error(model_dir: Path, problems: list[str]) -> ModelFormatError:
    """One problem: one line; several: a heading and one line each."""
    if len(problems) == 1:
        text = problems[0]
        return ModelFormatError(text if text.startswith(str(model_dir)) else
                                f"{model_dir}: {text}")
    return ModelFormatError(f"{model_dir} has {len(problems)} problems:\n"
                            + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class TensorInfo:
    """A checkpoint tensor as its file's header describes it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _load_pickle(path: Path) -> dict:
    """A .bin state dict, memory-mapped: tensor data is only read when it is used."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path} does not hold a state dict")
    return state


def _read_error(path: Path, e: Exception) -> ModelFormatError:
    if isinstance(e, ModelFormatError):
        return e
    if isinstance(e, PermissionError):
        return ModelFormatError(f"{path} cannot be read (permission denied); check the "
                                "file's permissions")
    if isinstance(e, (SafetensorError, RuntimeError, EOFError, OSError, ValueError)):
        return ModelFormatError(
            f"{path} cannot be read ({str(e).splitlines()[0][:200]}); the file is probably "
            "truncated or corrupted: download it again")
    # pickle.UnpicklingError for pickles that hold more than tensors
    return ModelFormatError(
        f"{path} is not a plain tensor checkpoint and is not loaded for safety ({e})")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one checkpoint file, without reading the tensor data."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                infos = {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype())
                         for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        else:
            infos = {name: (getattr(t, "shape", None), getattr(t, "dtype", None))
                     for name, t in _load_pickle(path).items()}
    except Exception as e:  # every failure is reported as a broken file
        raise _read_error(path, e) from None
    out = {}
    for name, (shape, dtype) in infos.items():
        if shape is None:
            raise ModelFormatError(f"{path}: {name} is not a tensor; is this a model checkpoint?")
        dtype = _ST_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
        if dtype is None:
            raise ModelFormatError(f"{path}: {name} has a data type localglm does not read "
                                   f"({infos[name][1]}); use a float16/bfloat16/float32 model")
        out[name] = TensorInfo(tuple(shape), dtype)
    return out


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def map_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file as views of a private memory map of it: no copy is
    made, pages come from the page cache as they are first used (and are shared with other
    processes that map the same file), and a tensor written to gets its own pages."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        start, end = info["data_offsets"]
        shape = info["shape"]
        if dtype is None:
            raise ModelFormatError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        if base + end > size or end - start != math.prod(shape) * dtype.itemsize:
            raise ModelFormatError(f"{path}: tensor {name} lies outside the file; the file is "
                                   "truncated or corrupted: download it again")
        if end == start:
            yield name, torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=(end - start) // dtype.itemsize,
                             offset=base + start)
        yield name, t.view(shape)


def read_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one checkpoint file, memory-mapped; pickles only with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            yield from map_safetensors(path)
            return
        state = _load_pickle(path)
    except Exception as e:
        raise _read_error(path, e) from None
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


PREFIX_ENCODER = "transformer.prefix_encoder."


def rebuilt_on_load(name: str) -> bool:
    """Tensors of official checkpoints that are rebuilt instead of read: the tied head and the
    rotary tables (as the official model does)."""
    return name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq")


@dataclass
class CheckReport:
    """What ``check_model_dir`` found: every problem, one line each, and the file headers."""

    model_dir: Path
    problems: list[str] = field(default_factory=list)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # from the readable files
    files: list[Path] = field(default_factory=list)
    config: ModelConfig | None = None

    def raise_if_problems(self) -> None:
        if self.problems:
            raise problems_error(self.model_dir, self.problems)


def check_model_dir(model_dir: Path, ptuning_ok: bool = False) -> CheckReport:
    """Everything ``localglm.load`` checks, without reading the weights (headers only).

    Config, tokenizer files, the index and its shards, Git LFS pointers, unreadable
    (truncated) files, and every tensor name and shape against config.json. All problems are
    collected, each naming its file. ``ptuning_ok``: a P-Tuning checkpoint (prefix encoder
    only, no tokenizer) is accepted too.
    """
    model_dir = Path(model_dir)
    report = CheckReport(model_dir)
    try:
        report.config = ModelConfig.from_file(model_dir / "config.json")
    except ModelFormatError as e:
        report.problems.append(str(e))
    files, problems = _weight_files(model_dir)
    report.problems += problems
    for f in files:
        if is_lfs_pointer(f):
            report.problems.append(_lfs_problem(f))
            continue
        try:
            report.tensors.update(read_header(f))
            report.files.append(f)
        except ModelFormatError as e:
            report.problems.append(str(e))
    ptuning = bool(report.tensors) and all(n.startswith(PREFIX_ENCODER) for n in report.tensors)
    if ptuning:
        if not ptuning_ok:
            report.problems.append(
                f"it holds only a P-Tuning v2 prefix ({PREFIX_ENCODER}*), not a model: use it "
                f"with a base model, e.g. `localglm chat BASE --ptuning {model_dir}`")
        return report
    report.problems += _tokenizer_problems(model_dir)
    if report.config is not None and files and len(report.files) == len(files):
        report.problems += tensor_problems(report.config, {
            n: t.shape for n, t in report.tensors.items()})
    return report


def _tokenizer_problems(model_dir: Path) -> list[str]:
    from .tokenizer import ChatGLMTokenizer

    problems = []
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing: download the complete model directory "
                            "(e.g. from THUDM/chatglm-6b), tokenizer files included")
        elif is_lfs_pointer(path):
            problems.append(_lfs_problem(path))
    if not problems:
        try:
            ChatGLMTokenizer.from_dir(model_dir)
        except ModelFormatError as e:
            problems.append(str(e))
    return problems


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model built from ``cfg`` reads from its checkpoint, with its shape.

    Built on the meta device (no memory); quantized configs get the stored int8/int4 layout.
    """
    from . import quantize
    from .loader import stored_quantization
    from .model import skeleton
    from .quantize.embedding import use_quantized_head

    model = skeleton(cfg)
    stored = stored_quantization(cfg)
    if stored is not None:
        bits, group = stored
        quantize.make_quantized_skeleton(model, bits, group, "localglm" if group else "official")
    if cfg.quantization_head_bits:
        use_quantized_head(model)
    return {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}


def tensor_problems(cfg: ModelConfig, found: dict[str, tuple[int, ...]]) -> list[str]:
    """Config fields and tensors that disagree between config.json and the weights' shapes.

    A base model without prefix-encoder tensors is fine with a P-Tuning config: the prefix
    comes from the --ptuning checkpoint.
    """
    try:
        expected = expected_shapes(cfg)
    except (ValueError, RuntimeError, TypeError) as e:
        return [f"config.json describes no valid model ({e})"]
    if not any(n.startswith(PREFIX_ENCODER) for n in found):
        expected = {n: s for n, s in expected.items() if not n.startswith(PREFIX_ENCODER)}
    return mismatch_lines(cfg, expected, found, rebuilt_on_load)


def validate_model_dir(model_dir: Path, ptuning_ok: bool = False) -> CheckReport:
    """``check_model_dir``, raising one ModelFormatError that lists every problem."""
    report = check_model_dir(model_dir, ptuning_ok)
    report.raise_if_problems()
    return report


def load_into(
    module: torch.nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    convert: Callable[[str, torch.Tensor], torch.Tensor],
    source: str,
    ignore: Callable[[str], bool] = rebuilt_on_load,
) -> None:
    """Assign checkpoint tensors to ``module`` (built on the meta device), one at a time.

    ``convert(name, tensor)`` turns each checkpoint tensor into its final dtype/device/format.
    Every missing, unexpected or wrong-shaped tensor is collected and reported in one error
    (``check_model_dir`` has already named the config.json fields that disagree, from the
    files; what arrives here may be quantized on the way or come from a P-Tuning checkpoint).
    """
    expected = module.state_dict(keep_vars=True)  # persistent parameters and buffers
    found: dict[str, tuple[int, ...]] = {}
    for name, t in tensors:
        found[name] = tuple(t.shape)
        if name in expected and found[name] == tuple(expected[name].shape):
            assign(module, name, convert(name, t))
    shapes = {n: tuple(t.shape) for n, t in expected.items()}
    layers = getattr(getattr(module, "config", None), "num_layers", 0)
    lines = tensor_lines(shapes, found, layers, ignore)
    if lines:
        raise ModelFormatError(
            f"{source} does not match its config.json:\n"
            + "\n".join(f"  {line}" for line in lines)
            + "\n  Check that config.json belongs to these weights, or download them again.")


def assign(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer ``name`` of ``module`` (e.g. on the meta device)."""
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def os_error_message(e: BaseException, path: Path) -> str:
    """One line for an OS error while writing ``path``: what happened and what to do."""
    code = getattr(e, "errno", None)
    text = getattr(e, "strerror", None) or str(e).splitlines()[0]
    if code == errno.ENOSPC or "os error 28" in str(e):  # safetensors wraps the OS error
        return (f"cannot write {path}: the disk is full (No space left on device); free up "
                "space or choose an output directory on another disk")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {path} ({text}); choose an output directory you can write to")
    return f"cannot write {path} ({text}); check the path or choose another output directory"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out_dir: Path, need_bytes: int = 0) -> None:
    """Raise a one-line LocalGLMError unless a new model directory can be written at ``out_dir``.

    Checked before any work: not a file, empty if it exists, its nearest existing parent a
    writable directory (probed by creating a temp dir there), and ``need_bytes`` free on it.
    """
    out_dir = Path(out_dir)
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise LocalGLMError(f"{out_dir} is a file; choose a new directory for the output")
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise LocalGLMError(f"{out_dir} exists and is not empty; choose a new output "
                                "directory")
        base = _existing_ancestor(out_dir)
        if not base.is_dir():
            raise LocalGLMError(f"{base} is a file, so {out_dir} cannot be created; choose "
                                "another output directory")
        free = shutil.disk_usage(base).free
        os.rmdir(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=base))
    except OSError as e:
        if e.errno == errno.ENOSPC or e.filename is None or Path(e.filename) == out_dir:
            raise LocalGLMError(os_error_message(e, out_dir)) from None
        raise LocalGLMError(  # the probe failed: e.g. /proc, a read-only mount, no permission
            f"cannot create {out_dir}: {base} does not accept new directories ({e.strerror}); "
            "choose an output directory you can write to") from None
    if need_bytes > free:
        raise LocalGLMError(
            f"{out_dir} needs about {_mib(need_bytes)} but {base} has only {_mib(free)} free; "
            "free up space or choose an output directory on another disk")


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def save_model_dir(out_dir: Path, state: dict[str, torch.Tensor], config: dict,
                   copy_from: Path | None = None, max_shard_bytes: int = 2 << 30) -> None:
    """Write safetensors shards + config.json (+ tokenizer files) atomically: temp dir, rename.

    Nothing is left behind on failure (a full disk, a read-only directory): the temp dir and
    any parent directories created for it are removed, and the error is one LocalGLMError line.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    created = []  # parents made here, removed again on failure
    parent = out_dir.absolute().parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        _write_model(tmp, state, config, copy_from, max_shard_bytes)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, (OSError, SafetensorError)):
            raise LocalGLMError(os_error_message(e, out_dir)) from None
        raise


def _write_model(tmp: Path, state: dict[str, torch.Tensor], config: dict,
                 copy_from: Path | None, max_shard_bytes: int) -> None:
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
