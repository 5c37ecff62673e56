"""KV cache: preallocated, grown in steps, reused; cached decode equals recomputation."""

import torch

from localglm.cache import KVCache


def test_grows_in_steps_and_caps():
    c = KVCache(2, 1, 2, 4, max_len=600, dtype=torch.float32, devices="cpu", step=256)
    c.reserve(10)
    assert c.capacity == 256
    k = torch.ones(1, 2, 10, 4)
    c.update(0, 0, k, k)
    c.update(1, 0, k, k)
    c.reserve(300)
    assert c.capacity == 512
    assert torch.equal(c.k[0][:, :, :10], k)  # contents survive growth
    c.reserve(590)
    assert c.capacity == 600


def test_storage_reused_across_rounds(tiny):
    """After the first rounds, chatting allocates no new cache storage."""
    tiny.chat("你好", [], max_new_tokens=8, do_sample=False)
    cache = tiny.cache()
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    size = cache.nbytes()
    history = []
    for i in range(5):
        _, history = tiny.chat(f"第{i}轮", history[-1:], max_new_tokens=8, do_sample=False)
    assert cache.nbytes() == size
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs


def test_cached_decode_equals_full_recompute(tiny):
    ids = tiny.tokenizer.encode("你好，请介绍一下你自己")
    new = tiny.generate(ids, max_new_tokens=6)
    full = tiny.logits(ids + new[:-1])
    for j in range(len(new)):
        # greedy choice at each step equals the argmax of a full forward at that position
        assert full[len(ids) - 1 + j].argmax().item() == new[j]
