"""Fidelity against the official implementation's outputs on the tiny fixture (float32)."""

import pytest
import torch

from localglm.chat import build_prompt

# Logits reach ~70; the reference itself moves by 2.2e-4 between fp32 and fp64 runs.
ATOL = 2e-3


def _case_ids(cases):
    return [c["name"] for c in cases["cases"]]


def test_prompt_ids_and_positions(tiny, cases):
    from localglm.generate import prompt_info

    for c in cases["cases"]:
        info = prompt_info(c["input_ids"], tiny.config)
        assert info.context == c["context_length"], c["name"]
        assert info.mask_position == c["mask_position"], c["name"]
        assert info.positions(0, c["seq_len"]) == c["position_ids"], c["name"]
        for step in c["decode_steps"]:
            index = step["past_length"]
            assert [p[0] for p in info.positions(index, index + 1)] == step["position_ids"]


def test_last_logits(tiny, cases, golden_logits):
    for c in cases["cases"]:
        got = tiny.logits(c["input_ids"])[-1]
        want = golden_logits[f"{c['name']}.last_logits"]
        assert (got - want).abs().max().item() < ATOL, c["name"]
        assert got.topk(5).indices.tolist() == c["last_top5"], c["name"]


def test_all_position_logits(tiny, cases, golden_logits):
    checked = 0
    for c in cases["cases"]:
        key = f"{c['name']}.all_logits"
        if key in golden_logits:
            got = tiny.logits(c["input_ids"])
            assert got.shape == golden_logits[key].shape
            assert (got - golden_logits[key]).abs().max().item() < ATOL, c["name"]
            checked += 1
    assert checked >= 2


def test_cached_decode_steps(tiny, cases, golden_logits):
    """Decode logits with the KV cache equal the official cached decode steps."""
    from localglm.generate import Batch, decode_one_token, new_cache, prefill

    for c in cases["cases"]:
        batch = Batch([c["input_ids"]], tiny.config, "cpu")
        cache = new_cache(tiny.model, 1, 256, torch.float32)
        with torch.inference_mode():
            logits = prefill(tiny.model, batch, cache, torch.float32)
            index = batch.width
            for step in c["decode_steps"]:
                token = torch.tensor([step["input_ids"]])
                logits = decode_one_token(tiny.model, batch, token, index, cache)
                want = golden_logits[f"{c['name']}.decode_step{step['step']}_logits"]
                assert (logits[0] - want).abs().max().item() < ATOL, (c["name"], step["step"])
                index += 1


def test_greedy_generations(tiny, cases):
    for c in cases["cases"]:
        got = tiny.generate(c["input_ids"], max_new_tokens=24)
        assert got == c["greedy_new_ids"], c["name"]
        assert tiny.tokenizer.decode(got) == c["greedy_text"], c["name"]


def test_left_padded_batch(tiny, cases, golden_logits):
    b = cases["batch"]
    prompts = [tiny.tokenizer.encode(t) for t in b["texts"]]
    padded, _ = tiny.tokenizer.batch_encode(b["texts"])
    assert padded == b["input_ids"]
    from localglm.generate import Batch, new_cache, prefill

    batch = Batch(prompts, tiny.config, "cpu")
    assert batch.ids.tolist() == b["input_ids"]
    assert batch.pos.tolist() == b["position_ids"]
    with torch.inference_mode():
        logits = prefill(tiny.model, batch, new_cache(tiny.model, 2, 64, torch.float32),
                         torch.float32)
    assert (logits - golden_logits["batch.last_logits"]).abs().max().item() < ATOL
    assert tiny.generate(prompts, max_new_tokens=8) == b["greedy_new_ids"]
    # each row of a batch gets what it gets alone
    assert [tiny.generate(p, max_new_tokens=8) for p in prompts] == b["greedy_new_ids"]


def test_mask_position_uses_mask_token(tiny, cases):
    c = next(c for c in cases["cases"] if c["name"] == "mask_infill_raw")
    assert 2001 not in c["input_ids"]  # no [gMASK]: the [MASK] branch
    assert tiny.generate(c["input_ids"], max_new_tokens=24) == c["greedy_new_ids"]


def test_chat_transcript(tiny, chat_golden):
    history = []
    for r in chat_golden["rounds"]:
        assert [list(h) for h in history] == r["history_in"]
        assert build_prompt(r["query"], history) == r["prompt"]
        assert tiny.tokenizer.encode(r["prompt"]) == r["input_ids"]
        response, history = tiny.chat(r["query"], history, max_length=r["max_length"],
                                      do_sample=False)
        assert response == r["response"]
        assert [list(h) for h in history] == r["history_out"]
        ids = tiny.generate(r["input_ids"], max_length=r["max_length"])
        assert ids == r["generated_ids"]


def test_stream_chat_partials(tiny, chat_golden):
    for s in chat_golden["stream_chat"]:
        history = [tuple(h) for h in s["history_in"]]
        ours = [resp for resp, _ in tiny.stream_chat(
            chat_golden["rounds"][s["round"]]["query"], history, max_length=s["max_length"],
            do_sample=False)]
        final = chat_golden["rounds"][s["round"]]["response"]
        assert ours[-1] == final
        # Every official partial response appears in ours, in order, except those that end in
        # an incomplete UTF-8 character (we hold those back until the character completes).
        official = [p for p in dict.fromkeys(s["partial_responses"]) if not p.endswith("\ufffd")]
        it = iter(ours)
        assert all(any(p == q for q in it) for p in official), s["round"]
        for p in ours:
            assert final.startswith(p)


# Largest |logit - golden| a reduced-precision run may show on the tiny model (logits reach
# ~70). Measured maxima on AVX2 and AVX-512(-BF16/AMX) dispatch: 1.92 (bf16), 0.23 (fp16).
REDUCED_BOUND = {"bfloat16": 2.5, "float16": 0.5}


@pytest.mark.reduced_precision
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_logits_and_greedy(dtype, cases, tiny_dir, golden_logits):
    """bf16/fp16 logits stay within the stated bound of the fp32 goldens, the top-1 token
    agrees wherever the golden top-1/top-2 margin exceeds twice that bound (no logit error can
    flip it there), and greedy runs agree on most tokens before they diverge."""
    import localglm

    bound = REDUCED_BOUND[dtype]
    m = localglm.load(tiny_dir, precision=dtype, device="cpu")
    agree = total = checked = 0
    for c in cases["cases"]:
        want = golden_logits[f"{c['name']}.last_logits"]
        got = m.logits(c["input_ids"])[-1]
        assert (got - want).abs().max() < bound, c["name"]
        top2 = want.topk(2).values
        if top2[0] - top2[1] > 2 * bound:
            assert got.argmax() == want.argmax(), c["name"]
            checked += 1
        ids = m.generate(c["input_ids"], max_new_tokens=24)
        n = min(len(ids), len(c["greedy_new_ids"]))
        agree += next((i for i in range(n) if ids[i] != c["greedy_new_ids"][i]), n)
        total += len(c["greedy_new_ids"])
    print(f"{dtype}: {agree}/{total} greedy tokens equal to the fp32 goldens before divergence; "
          f"top-1 checked on {checked} cases")
    assert agree / total > 0.5
    assert checked >= (6 if dtype == "float16" else 0)
