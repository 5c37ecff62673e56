"""What bounds a CPU process's memory: prompts in row chunks, freed activations returned to the
system, and a model skeleton that loads no extra PyTorch machinery."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DATA

import localglm
from localglm import model as model_mod
from localglm.quantize import cpu_kernels
from localglm.quantize import linear as linear_mod

IDS = [5, 17, 240, 33, 1000] * 12  # 60 tokens


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.reduced_precision
@pytest.mark.skipif(not cpu_kernels.supported(), reason="no numba kernels on this CPU")
def test_a_long_prompt_in_row_chunks_gives_the_same_logits(monkeypatch):
    # The int4 kernels treat every row on its own, so chunking changes nothing, bit for bit.
    m = localglm.load(DATA / "chatglm-6b-tiny-int4", device="cpu")
    assert m.dtype == torch.bfloat16
    whole = m.logits(IDS + [m.config.gmask_token_id, m.config.bos_token_id])

    rows = []
    product = cpu_kernels.matmul_int4

    def spy(x2, *args, **kwargs):
        rows.append(x2.shape[0])
        return product(x2, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "matmul_int4", spy)
    monkeypatch.setattr(linear_mod, "CPU_GEMV_CHUNK_ROWS", 7)
    monkeypatch.setattr(model_mod, "MLP_CHUNK_TOKENS", 16)
    chunked = m.logits(IDS + [m.config.gmask_token_id, m.config.bos_token_id])
    assert rows and max(rows) <= 7  # every product ran on a chunk
    assert 62 % 7 in rows and 16 % 7 in rows  # the ends of the 62 rows and of a 16-token part
    assert torch.equal(chunked, whole)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_prompt_activations_leave_the_process():
    out = _python("""
        import torch
        from localglm import malloc

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 >> 20

        assert malloc.return_large_blocks()
        a = torch.ones(4 << 20)  # 16 MiB; freeing it would raise glibc's threshold past it
        del a
        b = torch.ones(4 << 20)
        held = rss()
        del b
        print(held - rss())
    """)
    assert int(out) >= 14  # MiB given back at once


def test_loading_builds_the_skeleton_without_pytorchs_python_meta_kernels():
    # nn.Embedding's normal_ or an arange on the meta device imports ~800 modules of
    # PyTorch's Python reference kernels, dynamo and sympy (~70 MiB resident for the life of
    # the process).
    out = _python(f"""
        import sys
        import localglm
        m = localglm.load({str(DATA / "chatglm-6b-tiny-int4")!r}, device="cpu")
        m.logits([5, 17, m.config.gmask_token_id, m.config.bos_token_id])
        print("torch._dynamo" in sys.modules, "sympy" in sys.modules)
    """)
    assert out.split() == ["False", "False"]


def test_skeleton_holds_no_memory_and_the_rotary_table_is_official():
    cfg = localglm.load(DATA / "chatglm-6b-tiny", precision="float32", device="cpu").config
    sk = model_mod.skeleton(cfg)
    assert all(p.is_meta for p in sk.parameters())
    d = cfg.head_dim // 2
    with torch.device("meta"):  # the tables are small and computed on the CPU whatever the
        table = model_mod.RotaryTable(d, 8)  # default device
    ref = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).half().float()
    assert torch.equal(table.inv_freq, ref)
    assert torch.equal(table.cos[3], torch.cat([3 * ref, 3 * ref]).cos())
