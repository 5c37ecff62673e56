"""KV cache: preallocated, grown in steps, reused; cached decode equals recomputation."""

import pytest
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


def _solo(model, ids, **gen):
    return [(s.token, s.text) for s in model.stream_generate(ids, **gen)]


def test_interleaved_streams_each_get_their_solo_output(tiny):
    """Two streams consumed in turns on one thread used to share (and corrupt) one cache."""
    a = tiny.tokenizer.encode("你好")
    b = tiny.tokenizer.encode("介绍一下清华大学, please")
    gen = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.8, "seed": 7}
    want_a, want_b = _solo(tiny, a, max_new_tokens=12), _solo(tiny, b, **gen)
    want_ids = tiny.generate(a, max_new_tokens=12)
    sa, sb = tiny.stream_generate(a, max_new_tokens=12), tiny.stream_generate(b, **gen)
    got_a, got_b = [], []
    for x, y in zip(sa, sb, strict=True):
        got_a.append((x.token, x.text))
        got_b.append((y.token, y.text))
    assert got_a == want_a and got_b == want_b
    # A third generation while both are unfinished also gets its own cache.
    sa, sb = tiny.stream_generate(a, max_new_tokens=12), tiny.stream_generate(b, **gen)
    next(sa), next(sb)
    assert tiny.generate(a, max_new_tokens=12) == want_ids
    assert [(s.token, s.text) for s in sb] == want_b[1:]


def test_interleaved_stream_chats_match_their_solo_answers(tiny):
    want = [tiny.chat(q, [], temperature=0, max_new_tokens=10)[0] for q in ("你好", "晚上好")]
    streams = {i: tiny.stream_chat(q, [], temperature=0, max_new_tokens=10)
               for i, q in enumerate(("你好", "晚上好"))}
    last = {}
    while streams:  # one step of each in turn until both end
        for i in list(streams):
            item = next(streams[i], None)
            if item is None:
                del streams[i]
            else:
                last[i] = item[0]
    assert [last[0], last[1]] == want


def test_streams_on_two_threads_match_their_solo_outputs(tiny):
    import threading

    prompts = [tiny.tokenizer.encode(q) for q in ("你好", "今天天气怎么样", "hello")]
    want = [_solo(tiny, p, max_new_tokens=10) for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        got[i] = _solo(tiny, prompts[i], max_new_tokens=10)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_a_borrowed_cache_refuses_a_second_generation(tiny):
    from localglm.cache import CacheBusyError
    from localglm.generate import GenerationConfig, generate_step, new_cache

    cache = new_cache(tiny.model, 1, 64, torch.float32)
    ids = tiny.tokenizer.encode("你好")
    gen = GenerationConfig(max_new_tokens=4)
    first = generate_step(tiny.model, [ids], gen, cache, torch.float32)
    next(first)
    with pytest.raises(CacheBusyError, match="in use by another generation"):
        next(generate_step(tiny.model, [ids], gen, cache, torch.float32))
    first.close()  # finishing (or closing) a generation gives the cache back
    assert len(list(generate_step(tiny.model, [ids], gen, cache, torch.float32))) == 4


def test_reset_cache_gives_a_new_cache_and_spares_a_running_stream(tiny):
    ids = tiny.tokenizer.encode("你好")
    want = _solo(tiny, ids, max_new_tokens=8)
    old = tiny.cache()
    stream = tiny.stream_generate(ids, max_new_tokens=8)
    first = next(stream)
    tiny.reset_cache()
    assert tiny.cache() is not old
    assert [(first.token, first.text)] + [(s.token, s.text) for s in stream] == want
