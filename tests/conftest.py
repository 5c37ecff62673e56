import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
TINY = DATA / "chatglm-6b-tiny"
GOLDEN = TINY / "golden"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one thread avoids oversubscribing small shared machines."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cases():
    return json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def chat_golden():
    return json.loads((GOLDEN / "chat.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def golden_logits():
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / "logits.safetensors"))


@pytest.fixture(scope="session")
def tiny_dir():
    return TINY


@pytest.fixture(scope="session")
def tiny():
    """The tiny fixture model in float32 on CPU: the exact reference path."""
    import localglm

    return localglm.load(TINY, precision="float32", device="cpu")
