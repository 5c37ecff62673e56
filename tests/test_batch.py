"""Continuous batching: every sequence gets exactly the tokens it gets alone."""

import threading

import pytest
import torch

import localglm
from localglm.engine import make_generation_config as config
from localglm.errors import ContextTooLongError
from localglm.model import AttentionLayout

QUERIES = ["你好", "介绍一下清华大学, please tell me more about it", "hello",
           "今天天气怎么样？" * 5, "x",
           "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：再见\n答："]
SETTINGS = [
    {"max_new_tokens": 20},
    {"max_new_tokens": 30, "do_sample": True, "temperature": 0.9, "top_p": 0.8, "seed": 3},
    {"max_new_tokens": 10, "repetition_penalty": 1.3},
    {"max_new_tokens": 25, "do_sample": True, "top_k": 5, "seed": 11},
    {"max_new_tokens": 40},
    {"max_new_tokens": 15, "do_sample": True, "seed": 1, "max_length": 30},
]


def solo(model, prompts, settings):
    return [model.generate(p, **s) for p, s in zip(prompts, settings, strict=True)]


@pytest.fixture(scope="module")
def prompts(tiny):
    return [tiny.tokenizer.encode(q) for q in QUERIES]


@pytest.fixture(scope="module")
def int4():
    from conftest import DATA

    # float32 activations: the exact path (see test_16_bit_activations_agree_until_a_near_tie)
    return localglm.load(DATA / "chatglm-6b-tiny-int4", device="cpu", compute_dtype="float32")


def test_batched_list_equals_solo_for_mixed_lengths(tiny, prompts):
    want = solo(tiny, prompts, [{"max_new_tokens": 24}] * len(prompts))
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    # 3 rows for 6 prompts: later prompts join as earlier ones leave
    assert tiny.generate(prompts, max_new_tokens=24, max_batch=3) == want


@pytest.mark.parametrize("name", ["tiny", "int4"])
def test_mixed_settings_joining_mid_way_equal_solo(name, request, prompts):
    model = request.getfixturevalue(name)
    prompts = [model.tokenizer.encode(q) for q in QUERIES]
    want = solo(model, prompts, SETTINGS)
    # prefill_tokens=4: every prompt joins a few layers at a time between decode steps
    batch = model.batch(3, prefill_tokens=4)
    seqs = [batch.submit(p, config(**s)) for p, s in zip(prompts[:2], SETTINGS[:2], strict=True)]
    for _ in range(5):
        batch.step()
    # the first decodes every step; the second joined one layer per step (3 layers)
    assert [len(s.output) for s in seqs] == [5, 2]
    seqs += [batch.submit(p, config(**s)) for p, s in zip(prompts[2:], SETTINGS[2:], strict=True)]
    batch.run()
    assert [s.output for s in seqs] == want
    assert all(s.finished and s.error is None for s in seqs)


def test_long_prompt_joins_layer_groups_between_decode_steps(tiny, prompts):
    """A joining prompt never stalls the running sequence for its whole prefill."""
    long_prompt = tiny.tokenizer.encode("很长的问题" * 30)
    want = solo(tiny, [prompts[0], long_prompt], [{"max_new_tokens": 30}] * 2)
    layers = tiny.config.num_layers
    batch = tiny.batch(2, prefill_tokens=len(long_prompt) // layers)  # one layer per step
    running = batch.submit(prompts[0], config(max_new_tokens=30))
    batch.step()
    joining = batch.submit(long_prompt, config(max_new_tokens=30))
    before = len(running.output)
    for _ in range(layers - 1):
        batch.step()
        assert not joining.output  # still prefilling, one layer per step...
        assert len(running.output) == before + 1  # ...while the other decodes every step
        before += 1
    batch.step()  # the last layer: its first token
    assert len(joining.output) == 1 and len(running.output) == before + 1
    batch.run()
    assert [running.output, joining.output] == want


def test_cancelled_sequence_frees_its_row(tiny, prompts):
    want = solo(tiny, prompts[:3], [{"max_new_tokens": 40}] * 3)
    batch = tiny.batch(2)
    batch.prefill_ratio = 1e9  # a joining prompt in one step however long its layers take
    a, b = (batch.submit(p, config(max_new_tokens=40)) for p in prompts[:2])
    batch.step()
    batch.step()
    c = batch.submit(prompts[2], config(max_new_tokens=40))
    batch.step()
    assert c.row is None and not c.output  # no free row yet
    a.cancel()
    batch.step()  # a leaves; b moves to row 0, c takes row 1
    assert (a.finished, b.row, c.row) == (True, 0, 1) and len(c.output) == 1
    batch.run()
    assert len(a.output) < 40 and a.output == want[0][:len(a.output)]
    assert [b.output, c.output] == want[1:]


def test_interleaved_streams_on_one_thread_share_a_batch(tiny, prompts):
    """Iterating sequences with no worker thread steps the batch as needed."""
    want = [list(tiny.stream_generate(p, max_new_tokens=12)) for p in prompts[:3]]
    batch = tiny.batch(3)
    streams = [tiny.stream_generate(p, max_new_tokens=12, batch=batch) for p in prompts[:3]]
    got = [[] for _ in streams]
    live = dict(enumerate(streams))
    while live:
        for i in list(live):
            step = next(live[i], None)
            if step is None:
                del live[i]
            else:
                got[i].append(step)
    for g, w in zip(got, want, strict=True):
        assert [(s.text, s.token, s.finish_reason) for s in g] == \
            [(s.text, s.token, s.finish_reason) for s in w]


def test_threads_consume_while_another_thread_steps(tiny, prompts):
    want = [tiny.chat(q, [], temperature=0, max_new_tokens=16)[0] for q in QUERIES]
    batch = tiny.batch(4)
    batch.driven = True
    stop = threading.Event()

    def drive():
        while not stop.is_set():
            if batch.has_work():
                batch.step()
            else:
                stop.wait(0.001)

    driver = threading.Thread(target=drive)
    driver.start()
    got = [None] * len(QUERIES)

    def answer(i):
        *_, last = tiny.chat_stream(QUERIES[i], [], temperature=0, max_new_tokens=16,
                                    do_sample=False, batch=batch)
        got[i] = last.response

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(QUERIES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    driver.join(10)
    assert got == want


def test_ptuning_prefix_in_a_batch(tiny_dir):
    from conftest import DATA

    model = localglm.load(tiny_dir, precision="float32", device="cpu",
                          ptuning=DATA / "chatglm-6b-tiny-ptuning")
    prompts = [model.tokenizer.encode(q) for q in QUERIES[:4]]
    want = solo(model, prompts, [{"max_new_tokens": 12}] * 4)
    assert model.generate(prompts, max_new_tokens=12, max_batch=2) == want


def test_a_prompt_too_long_fails_alone(tiny, prompts):
    batch = tiny.batch(2)
    ok = batch.submit(prompts[0], config(max_new_tokens=5))
    bad = batch.submit(list(range(5, 5 + tiny.max_context + 1)), config(max_new_tokens=5))
    batch.run()
    assert ok.output == tiny.generate(prompts[0], max_new_tokens=5)
    assert isinstance(bad.error, ContextTooLongError)
    with pytest.raises(ContextTooLongError, match="context holds"):
        list(bad)


def test_per_row_lengths_mask():
    """Rows of different lengths: each row sees its own tokens only (prefix-LM rule kept)."""
    layout = AttentionLayout(start=4, kv_len=5, context=[2, 1], lengths=[5, 3])
    mask = layout.mask(1, "cpu")[:, 0, 0]  # (B, kv)
    assert mask.tolist() == [[True] * 5, [True, True, True, False, False]]
    assert layout.slot(1) == [4, 2]
    layout = AttentionLayout(start=0, kv_len=4, context=[2], lengths=[3])
    assert layout.mask(3, "cpu")[0, 0].tolist() == [
        [True, True, False, False], [True, True, False, False], [True, True, True, False]]


def test_batched_decode_matches_single_rows_numerically(tiny, prompts):
    """Logits of a batched decode step equal each row's own, to float32 rounding."""
    batch = tiny.batch(3)
    seqs = [batch.submit(p, config(max_new_tokens=3)) for p in prompts[:3]]
    batch.run()
    for seq in seqs:
        ids = seq.prompt + seq.output[:-1]
        full = tiny.logits(ids)[len(seq.prompt) - 1:]
        assert full.argmax(-1).tolist() == seq.output
    assert torch.isfinite(batch.cache.k[0]).all()


def test_16_bit_activations_agree_until_a_near_tie(tiny_dir, prompts):
    """bf16 matrix products of several rows round differently from one row's, so a batched
    sequence follows its solo output until the first near-tie; its first token (from its own
    prefill) is always the same."""
    model = localglm.load(tiny_dir, precision="bfloat16", device="cpu")
    want = solo(model, prompts[:5], [{"max_new_tokens": 40}] * 5)
    got = model.generate(prompts[:5], max_new_tokens=40, max_batch=5)
    same = [next((i for i, (a, b) in enumerate(zip(w, g, strict=False)) if a != b),
                 min(len(w), len(g))) for w, g in zip(want, got, strict=True)]
    assert all(n >= 1 for n in same) and sum(same) >= 0.5 * sum(map(len, want)), same


def test_a_failing_prefill_ends_only_its_own_sequence(tiny, prompts, monkeypatch):
    batch = tiny.batch(3)
    ok = batch.submit(prompts[0], config(max_new_tokens=6))
    batch.step()
    real_embed = tiny.model.embed

    def failing_embed(ids, pos, dtype):
        if ids.shape[1] == len(prompts[1]):
            raise RuntimeError("out of memory")
        return real_embed(ids, pos, dtype)

    monkeypatch.setattr(tiny.model, "embed", failing_embed)
    bad = batch.submit(prompts[1], config(max_new_tokens=6))
    later = batch.submit(prompts[2], config(max_new_tokens=6))
    batch.run()
    monkeypatch.undo()
    assert str(bad.error) == "out of memory" and bad.output == []
    assert [ok.output, later.output] == solo(tiny, [prompts[0], prompts[2]],
                                             [{"max_new_tokens": 6}] * 2)


def test_a_joining_prompt_runs_layers_for_about_two_decode_steps_time(tiny, prompts):
    """Layers are run until the step's prefill took prefill_ratio decode steps (>= 1 layer)."""
    batch = tiny.batch(3)
    assert batch.prefill_tokens is None and batch.prefill_ratio == 2.0
    batch.prefill_ratio = 0.0  # any time is too much: exactly one layer per step
    running = batch.submit(prompts[0], config(max_new_tokens=30))
    batch.step()
    batch.step()
    joining = batch.submit(prompts[3], config(max_new_tokens=5))
    for _ in range(tiny.config.num_layers - 1):
        batch.step()
        assert not joining.output
    batch.step()
    assert len(joining.output) == 1 and len(running.output) == 2 + tiny.config.num_layers
    batch.prefill_ratio = 1e9  # any time is fine: the whole prompt in one step
    late = batch.submit(prompts[2], config(max_new_tokens=5))
    batch.step()
    assert len(late.output) == 1
