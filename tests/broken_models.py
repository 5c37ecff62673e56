"""Copies of the tiny model broken the way real downloads break, and the CLI run as a user would."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 123\n"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("golden"))
    return dst


def edit_config(model: Path, **fields) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(fields)
    (model / "config.json").write_text(json.dumps(cfg))


def make_lfs_pointer(path: Path) -> None:
    path.write_text(LFS_POINTER.format("ab" * 32))


def truncate(path: Path, keep: int = 5000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def run_cli(*args, timeout=300):
    """`python -m localglm.cli ARGS` with this checkout first on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "localglm.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
