"""notebooks/colab.ipynb, executed top to bottom on the demo model with the internet cells off."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("gradio", reason="the notebook's web chat needs gradio (localglm[serve])")

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"
# Appended to the in-memory copy only: the web chat answers, then stops.
CHECK = """import urllib.request
print("web chat status", urllib.request.urlopen(web.local_url, timeout=30).status)
web.close()"""


def cell_text(cell) -> str:
    """Everything a cell showed: printed text and the final state of its displays."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            data = out["data"]
            parts.append(data.get("text/markdown") or data.get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out["traceback"]))
    return "".join(parts)


def test_notebook_runs_offline_on_the_demo_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALGLM_NOTEBOOK_MODEL", "demo")
    monkeypatch.setenv("LOCALGLM_NOTEBOOK_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK))
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    shown = {i: cell_text(c) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(shown.values())
    assert "model: demo; internet: no" in text
    assert "the built-in demo model needs no download" in text
    assert "chatglm-6b-demo: float32 weights on cpu" in text
    hello = next(t for t in shown.values() if t.startswith("你好"))
    assert "localglm" in hello
    int4 = next(t for t in shown.values() if "localglm chat THUDM/chatglm-6b-int4" in t)
    assert "localglm pull THUDM/chatglm-6b-int4" in int4
    assert "web chat: http://127.0.0.1:" in text
    assert shown[len(nb.cells) - 1].startswith("web chat status 200")
