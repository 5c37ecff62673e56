"""Layers split over several CUDA devices give the same logits (skipped without CUDA)."""

import pytest
import torch

import localglm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_split_over_devices_matches_single_device(tiny, tiny_dir):
    n = torch.cuda.device_count()
    devices = ",".join(f"cuda:{i % n}" for i in range(max(n, 2)))
    split = localglm.load(tiny_dir, precision="float32", devices=devices)
    ids = tiny.tokenizer.encode("你好，请介绍一下你自己")
    assert (split.logits(ids) - tiny.logits(ids)).abs().max().item() < 2e-3
    assert split.generate(ids, max_new_tokens=12) == tiny.generate(ids, max_new_tokens=12)


@cuda
def test_single_cuda_device_matches_cpu(tiny, tiny_dir):
    gpu = localglm.load(tiny_dir, precision="float32", device="cuda")
    ids = tiny.tokenizer.encode("你好")
    assert (gpu.logits(ids) - tiny.logits(ids)).abs().max().item() < 2e-3


def test_auto_on_cpu_uses_bfloat16(tiny_dir):
    m = localglm.load(tiny_dir, device="cpu")
    assert m.precision == "bfloat16" and m.dtype == torch.bfloat16
