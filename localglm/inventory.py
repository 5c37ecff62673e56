"""Which models are on this machine: the Hugging Face cache and model directories, each with
its precision, size on disk and whether it is complete; and removing a model from the cache."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LocalGLMError

_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass
class ModelEntry:
    name: str  # repo id, or the directory as given
    path: Path
    revision: str  # refs pointing at a cached snapshot ("main"), or "-" for a directory
    precision: str  # fp16 / bf16 / fp32 / int8 / int4 (+ group size), "?" when unknown
    size: int  # bytes on disk
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "complete" if not self.problems else "incomplete: " + "; ".join(self.problems)


def precision_of(config: dict) -> str:
    """The weight precision a ChatGLM-6B config.json declares."""
    bits = config.get("quantization_bit") or 0
    if bits:
        group = config.get("quantization_group_size") or 0
        return f"int{bits}" + (f" g{group}" if group else "")
    dtype = config.get("torch_dtype")
    return _DTYPES.get(dtype, dtype if isinstance(dtype, str) else "?")


def read_config(model_dir: Path) -> dict | None:
    try:
        d = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def check_model_dir(model_dir: Path) -> list[str]:
    """Everything that keeps ``model_dir`` from loading as a checkpoint (empty when complete):
    missing files (also links into the cache whose blob is gone), shards the index names but
    the directory lacks, and Git LFS pointer files in place of the real ones."""
    from .weights import TOKENIZER_FILES, is_lfs_pointer

    problems, missing, pointers = [], [], []
    needed = ["config.json", *_weight_files(model_dir), *TOKENIZER_FILES]
    for name in needed:
        path = model_dir / name
        if not path.is_file():
            missing.append(name)
        elif is_lfs_pointer(path):
            pointers.append(name)
    if not any(_is_weight(n) for n in needed):
        problems.append("no weights (*.safetensors or pytorch_model*.bin)")
    if missing:
        problems.append("missing " + ", ".join(missing))
    if pointers:
        problems.append("Git LFS pointers instead of files: " + ", ".join(pointers)
                        + " (run `git lfs pull` there)")
    if not missing and not pointers and read_config(model_dir) is None:
        problems.append("config.json is not valid JSON")
    return problems


def _is_weight(name: str) -> bool:
    return name.endswith((".safetensors", ".bin"))


def _weight_files(model_dir: Path) -> list[str]:
    """The shards the index lists (safetensors preferred, as the loader does), else the files."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = model_dir / index_name
        if index.exists():
            try:  # every shard the index names, present or not
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                return [index_name, *sorted(set(weight_map.values()))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return [index_name]  # an unreadable index: reported as a pointer or below
        files = sorted(p.name for p in model_dir.glob(pattern))
        if files:
            return files
    return []


def dir_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links followed, each target counted once)."""
    seen, total = set(), 0
    for p in path.rglob("*"):
        try:
            st = p.stat()
        except OSError:  # a link whose target is gone
            continue
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def describe_dir(path: Path, name: str | None = None, revision: str = "-",
                 size: int | None = None) -> ModelEntry:
    """A model directory (or a cache snapshot) as a list entry."""
    if not path.is_dir():
        return ModelEntry(name or str(path), path, revision, "?", 0, ["not a directory"])
    config = read_config(path)
    problems = check_model_dir(path)
    if config is not None and config.get("model_type") not in (None, "chatglm"):
        problems.insert(0, f"not ChatGLM-6B (model_type {config.get('model_type')!r})")
    return ModelEntry(name or str(path), path, revision,
                      precision_of(config) if config else "?",
                      dir_size(path) if size is None else size, problems)


def cached_models(cache: Path) -> list[ModelEntry]:
    """One entry per model revision in the Hugging Face cache at ``cache``."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        return []
    entries = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            refs = ",".join(sorted(rev.refs)) or rev.commit_hash[:12]
            entries.append(describe_dir(Path(rev.snapshot_path), repo.repo_id, refs,
                                        rev.size_on_disk))
    return entries


@dataclass
class Deletion:
    repo_id: str
    what: str  # e.g. "2 revisions (main, 1a2b3c4d5e6f)"
    size: int  # bytes freed
    execute: Callable[[], None]


def plan_delete(repo_id: str, cache: Path) -> Deletion:
    """How deleting every revision of ``repo_id`` from the cache would go (nothing deleted yet)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    from .hub import repo_dir

    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        info = None
    repo = next((r for r in info.repos if r.repo_id == repo_id and r.repo_type == "model"),
                None) if info else None
    if repo is not None:
        revs = sorted(repo.revisions, key=lambda r: r.commit_hash)
        strategy = info.delete_revisions(*(r.commit_hash for r in revs))
        names = ", ".join(",".join(sorted(r.refs)) or r.commit_hash[:12] for r in revs)
        what = f"{len(revs)} revision{'s' * (len(revs) != 1)} ({names})"
        # Every revision goes, so the whole repo folder does (refs and file lists included).
        return Deletion(repo_id, what, dir_size(repo.repo_path), strategy.execute)
    # A folder the scan does not list (e.g. a download stopped before any file was complete).
    folder = repo_dir(repo_id, cache)
    if folder.is_dir():
        return Deletion(repo_id, "an unfinished download", dir_size(folder),
                        lambda: shutil.rmtree(folder))
    raise LocalGLMError(f"{repo_id} is not in the Hugging Face cache ({cache}); "
                        "`localglm list` shows what is")
