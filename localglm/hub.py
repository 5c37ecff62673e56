"""Getting models: `localglm pull` from the Hugging Face Hub (or a mirror, or ModelScope).

Downloads go through ``huggingface_hub`` (its cache layout, progress bars and retries). On top
of it localglm fetches only the files a ChatGLM-6B checkpoint needs (never a model's own
``*.py`` code), checks every file against the checksum the hub publishes for it, and fetches
a file whose bytes do not match once more before giving up with its name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from .errors import LocalGLMError, ModelFormatError

DEFAULT_ENDPOINT = "https://huggingface.co"
MIRROR = "https://hf-mirror.com"  # the mirror most used in mainland China
MODELSCOPE_URL = "https://modelscope.cn/models"
# Files a checkpoint is made of, and its docs. Code is never on this list: localglm never
# downloads or runs a model repository's own Python (modeling_chatglm.py, quantization.py, ...).
ALLOW_PATTERNS = (
    "config.json", "generation_config.json", "quantize_config.json",
    "quantization_config.json", "adapter_config.json",
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
    "ice_text.model", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "*.md", "LICENSE*", "MODEL_LICENSE*", "NOTICE*",
)
CODE_PATTERNS = ("*.py", "*.pyc", "*.c", "*.cc", "*.cpp", "*.cu", "*.h", "*.so", "*.dll",
                 "*.dylib", "*.sh", "*.ipynb")


class HubError(LocalGLMError):
    """A download that could not be done (unknown model, unreachable hub, bad bytes)."""


def is_allowed(name: str) -> bool:
    """Whether ``pull`` fetches repo file ``name``: top-level checkpoint files only, no code."""
    if "/" in name or any(fnmatchcase(name, p) for p in CODE_PATTERNS):
        return False
    return any(fnmatchcase(name, p) for p in ALLOW_PATTERNS)


def is_code(name: str) -> bool:
    return any(fnmatchcase(name.rsplit("/", 1)[-1], p) for p in CODE_PATTERNS)


def hub_cache_dir() -> Path:
    """The Hugging Face cache, from the environment as it is now (HF_HUB_CACHE, HF_HOME, ...)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_endpoint(endpoint: str | None = None) -> str:
    """``--endpoint``, else HF_ENDPOINT (e.g. https://hf-mirror.com), else huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def repo_dir(repo_id: str, cache: Path | None = None) -> Path:
    """Where the cache keeps ``repo_id`` (huggingface_hub's layout: models--ORG--NAME)."""
    return (cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, cache: Path | None = None) -> Path | None:
    """The snapshot directory of ``repo_id``'s main revision in the cache, if there is one.

    A repo pulled only at another revision (no ``refs/main``) is found when it has exactly one
    snapshot.
    """
    folder = repo_dir(repo_id, cache)
    ref = folder / "refs" / "main"
    if ref.is_file():
        snap = folder / "snapshots" / ref.read_text(encoding="utf-8").strip()
        return snap if snap.is_dir() else None
    snaps = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
    return snaps[0] if len(snaps) == 1 else None


def resolve_cached(repo_id: str) -> Path:
    """A model id's directory in the cache, checked to be complete; never downloads."""
    from .inventory import check_model_dir

    snap = cached_snapshot(repo_id)
    if snap is None:
        raise ModelFormatError(
            f"model {repo_id!r} is neither a directory nor in the Hugging Face cache "
            f"({hub_cache_dir()}); download it with `localglm pull {repo_id}`")
    problems = check_model_dir(snap)
    if problems:
        raise ModelFormatError(
            f"{repo_id} in the Hugging Face cache is incomplete ({'; '.join(problems)}); "
            f"run `localglm pull {repo_id}` to finish the download")
    return snap


# --- what to fetch --------------------------------------------------------------------------

@dataclass
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # LFS files: sha256 of the content
    git_oid: str | None  # other files: git blob id (sha1 of "blob SIZE\0" + content)


@dataclass
class PullPlan:
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    files: list[RemoteFile]
    skipped: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def describe(self, dest: Path) -> str:
        from .devices import fmt_bytes

        code = [n for n in self.skipped if is_code(n)]
        other = [n for n in self.skipped if not is_code(n)]
        lines = [
            f"source:      {self.endpoint}/{self.repo_id} (revision {self.revision}, "
            f"commit {self.commit[:12]})",
            f"destination: {dest}",
            f"files:       {len(self.files)}, {fmt_bytes(self.size)}: "
            + ", ".join(f.name for f in self.files),
        ]
        if code:
            lines.append("not fetched: " + ", ".join(code)
                         + " (model code: localglm never downloads or runs it)")
        if other:
            lines.append("not needed:  " + ", ".join(other))
        return "\n".join(lines)


def plan_pull(repo_id: str, revision: str, endpoint: str) -> PullPlan:
    """Ask the hub which files ``repo_id`` has at ``revision``, with sizes and checksums."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a model id ({_first_line(e)})") from None
    with _hub_errors(repo_id, revision, endpoint):
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision,
                                                   files_metadata=True)
    files, skipped = [], []
    for s in info.siblings or []:
        if not is_allowed(s.rfilename):
            skipped.append(s.rfilename)
            continue
        sha256 = s.lfs.sha256 if s.lfs is not None else None
        files.append(RemoteFile(s.rfilename, s.size, sha256, None if s.lfs else s.blob_id))
    if not info.sha:
        raise HubError(f"{endpoint}/{repo_id} did not say which commit {revision!r} is; is "
                       f"{endpoint} a Hugging Face Hub (or a mirror of one)?")
    if not any(f.name == "config.json" for f in files):
        raise HubError(f"{endpoint}/{repo_id} has no config.json; is it a ChatGLM-6B model?")
    return PullPlan(repo_id, revision, info.sha, endpoint, files, skipped)


# --- checksums ------------------------------------------------------------------------------

@dataclass
class Mismatch:
    name: str
    kind: str  # "sha256", "git blob id" or "size"
    expected: str
    actual: str


def file_digests(path: Path, git: bool, progress=None) -> tuple[str, str]:
    """(sha256, git blob id) of a file, read once in 8 MiB blocks."""
    sha = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % path.stat().st_size) if git else None
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            sha.update(block)
            if blob is not None:
                blob.update(block)
            if progress is not None:
                progress.update(len(block))
    return sha.hexdigest(), blob.hexdigest() if blob is not None else ""


def verify_files(root: Path, files: list[RemoteFile], show: bool = True) -> list[Mismatch]:
    """Check each downloaded file against the hub's size and checksum; returns the mismatches."""
    from tqdm.auto import tqdm

    bad = []
    total = sum(f.size or 0 for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying checksums",
              disable=not show, leave=False) as bar:
        for f in files:
            path = root / f.name
            if not path.is_file():
                bad.append(Mismatch(f.name, "file", "present", "missing"))
                continue
            size = path.stat().st_size
            if f.size is not None and size != f.size:
                bad.append(Mismatch(f.name, "size", str(f.size), str(size)))
                continue
            sha256, oid = file_digests(path, git=f.git_oid is not None, progress=bar)
            if f.sha256 and sha256 != f.sha256:
                bad.append(Mismatch(f.name, "sha256", f.sha256, sha256))
            elif f.git_oid and oid != f.git_oid:
                bad.append(Mismatch(f.name, "git blob id", f.git_oid, oid))
    return bad


def remove_file(path: Path) -> None:
    """Delete a file from a snapshot: the link and, in the cache, the blob it points to."""
    blob = path.resolve() if path.is_symlink() else None
    path.unlink(missing_ok=True)
    if blob is not None:
        blob.unlink(missing_ok=True)


# --- downloading ----------------------------------------------------------------------------

def _network_errors() -> tuple[type[BaseException], ...]:
    """OSError plus the HTTP library's base error (httpx2, httpx or requests by version)."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"),
                         ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line errors that say what to do."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{endpoint}/{repo_id}"
    again = "; files already complete are kept: run the same `localglm pull` again to continue"
    try:
        yield
    except GatedRepoError:
        raise HubError(f"{where} is gated: accept its terms on the model page, then log in "
                       "(`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise HubError(f"no model {repo_id!r} at {endpoint} (check the id; a private model "
                       "needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{where} has no revision {revision!r}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        hint = again if status >= 500 or status in (408, 429) else ""
        raise HubError(f"{where}: the hub answered {status or 'an error'} "
                       f"({_first_line(e)}){hint}") from None
    except ValueError as e:  # a 200 answer that is not the hub's JSON
        raise HubError(f"{endpoint} did not answer like a Hugging Face Hub ({_first_line(e)}); "
                       "check --endpoint / HF_ENDPOINT") from None
    except LocalEntryNotFoundError:
        raise HubError(f"cannot reach {endpoint}; check the network, or use a mirror with "
                       f"--endpoint / HF_ENDPOINT (e.g. {MIRROR}){again}") from None
    except _network_errors() as e:
        if "Connect" in type(e).__name__:  # httpx ConnectError/ConnectTimeout, requests' too
            raise HubError(f"cannot reach {endpoint} ({_first_line(e)}); check the network, or "
                           f"use a mirror with --endpoint / HF_ENDPOINT (e.g. {MIRROR})") from None
        raise HubError(f"download from {where} failed ({_first_line(e)}){again}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def download(plan: PullPlan, names: list[str], cache: Path, local_dir: Path | None = None,
             max_workers: int = 8) -> Path:
    """Fetch ``names`` of ``plan`` with huggingface_hub; returns the snapshot directory."""
    from huggingface_hub import snapshot_download

    with _hub_errors(plan.repo_id, plan.revision, plan.endpoint):
        path = Path(snapshot_download(
            plan.repo_id, revision=plan.revision, endpoint=plan.endpoint, cache_dir=cache,
            local_dir=local_dir, allow_patterns=[glob.escape(n) for n in names],
            max_workers=max_workers))
    if local_dir is None and path.name != plan.commit:
        raise HubError(f"{plan.repo_id} changed on the hub during the download (now at commit "
                       f"{path.name[:12]}); run `localglm pull` again")
    return path


def pull(repo_id: str, revision: str = "main", endpoint: str | None = None,
         cache: Path | None = None, local_dir: Path | None = None, max_workers: int = 8,
         log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Download ``repo_id`` into the Hugging Face cache (or ``local_dir``) and verify it.

    Returns the model directory. A file whose checksum does not match is removed and fetched
    once more; if it is still wrong, HubError names it (and it is removed again).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it to pull")
    endpoint = hub_endpoint(endpoint)
    cache = cache or hub_cache_dir()
    plan = plan_pull(repo_id, revision, endpoint)
    log(plan.describe(local_dir or repo_dir(repo_id, cache)))
    root = download(plan, [f.name for f in plan.files], cache, local_dir, max_workers)
    bad = verify_files(root, plan.files, show=progress)
    if bad:
        log("checksum mismatch: " + "; ".join(_fmt(m) for m in bad)
            + "; removed, downloading again")
        for m in bad:
            remove_file(root / m.name)
        again = [f for f in plan.files if f.name in {m.name for m in bad}]
        root = download(plan, [f.name for f in again], cache, local_dir, max_workers)
        bad = verify_files(root, again, show=progress)
        for m in bad:
            remove_file(root / m.name)
        if bad:
            raise HubError(
                "; ".join(_fmt(m) for m in bad) + f" after downloading twice from {endpoint}; "
                "the file was removed. Try again later, or another --endpoint")
    return root


def _fmt(m: Mismatch) -> str:
    return f"{m.name}: {m.kind} is {m.actual[:16]}, expected {m.expected[:16]}"


def pull_modelscope(model_id: str, revision: str | None = None, local_dir: Path | None = None,
                    log: Callable[[str], None] = print) -> Path:
    """Download ``model_id`` from ModelScope with the ``modelscope`` package (same allow-list).

    ModelScope checks each file's sha256 itself while downloading.
    """
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise HubError("--source modelscope needs the modelscope package: "
                       'pip install "localglm[modelscope]"') from None
    log(f"source:      {MODELSCOPE_URL}/{model_id} (revision {revision or 'default'})")
    log(f"destination: {local_dir or 'the ModelScope cache (MODELSCOPE_CACHE)'}")
    try:
        path = Path(snapshot_download(
            model_id, revision=revision, local_dir=str(local_dir) if local_dir else None,
            allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(CODE_PATTERNS)))
    except TypeError:
        raise HubError("this modelscope is too old (no allow_patterns); "
                       'pip install -U "localglm[modelscope]"') from None
    except Exception as e:  # modelscope has no common error base; show its message in one line
        raise HubError(f"ModelScope download of {model_id} failed ({_first_line(e)})") from None
    for p in path.iterdir():  # never keep code, whatever the source library did
        if p.is_file() and is_code(p.name):
            p.unlink()
    return path
