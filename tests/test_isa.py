"""Results that depend on the CPU's instruction set, checked on every code path this CPU has.

PyTorch picks its kernels by ATEN_CPU_CAPABILITY (oneDNN by ONEDNN_MAX_CPU_ISA) and numba
compiles for NUMBA_CPU_NAME/NUMBA_CPU_FEATURES, each read once at start-up, so the AVX2 run of
the `reduced_precision` tests happens in a fresh interpreter. On an AVX2-only CPU the default
run already is that run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localglm.quantize.cpu_kernels import AVX2_ENV

ROOT = Path(__file__).resolve().parent.parent


def _native_is_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")


@pytest.mark.skipif(_native_is_avx2(), reason="this CPU's native code path is AVX2 already")
@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "avx2",
                    reason="this run is the AVX2 run")
def test_reduced_precision_tests_pass_on_the_avx2_path():
    env = {**os.environ, **AVX2_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "reduced_precision", "-p",
         "no:cacheprovider", str(ROOT / "tests")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
    # the kernels really compiled for AVX2 in that run
    probe = subprocess.run(
        [sys.executable, "-c", "from localglm.quantize import cpu_kernels as k; "
         "import torch; print(k.isa(), torch.backends.cpu.get_cpu_capability())"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() in (["avx2", "AVX2"], ["None", "AVX2"]), probe.stdout
