"""Continuous-batching throughput: N streams at once, and the gap a long prompt's join causes.

Used by ``localglm bench --concurrency``. Times are taken when each step hands its tokens
out, as a server's streams would see them (tokenization and HTTP not included).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .batch import ContinuousBatch
from .generate import GenerationConfig
from .model import ChatGLMModel


@dataclass
class ConcurrencyResult:
    streams: int
    aggregate_tokens_per_s: float  # all streams' tokens / wall time (prefill included)
    stream_tokens_per_s: float  # mean decode speed of one stream, after its first token
    ttft_s_mean: float  # time to first token, from submission
    ttft_s_max: float
    worst_gap_s: float  # longest wait between two tokens of one stream
    # median step with every stream decoding and no prefill in it; 0 if there was none
    # (the streams' answers were shorter than the time the last one took to join)
    decode_step_s: float


@dataclass
class JoinResult:
    prompt_tokens: int
    decode_gap_s: float  # a running stream's usual gap between tokens
    worst_gap_s: float  # its longest gap while the long prompt joined
    prefill_steps: int  # steps the long prompt's prefill was spread over
    prefill_s: float  # from the long prompt's submission to its first token


@dataclass
class BatchBench:
    prompt_tokens: int
    new_tokens: int
    levels: list[ConcurrencyResult] = field(default_factory=list)
    join: JoinResult | None = None


def _prompt(cfg, n: int, salt: int) -> list[int]:
    """An ``n``-token chat prompt (ordinary ids, then [gMASK] <sop>), different per salt."""
    return [5 + (i * 7919 + salt * 104729) % 1000 for i in range(n - 2)] + [
        cfg.gmask_token_id, cfg.bos_token_id]


def _run(batch: ContinuousBatch, seqs) -> tuple[dict, list[float]]:
    """Step until done: the time each token of each sequence came out, and the durations of
    the steps in which every sequence decoded (no prefill)."""
    times = {id(s): [] for s in seqs}
    full_steps = []
    while batch.has_work():
        before = [len(s.output) for s in seqs]
        t = time.perf_counter()
        batch.step()
        now = time.perf_counter()
        if all(n and len(s.output) == n + 1 for n, s in zip(before, seqs, strict=True)):
            full_steps.append(now - t)
        for s in seqs:
            times[id(s)] += [now] * (len(s.output) - len(times[id(s)]))
    return times, full_steps


@torch.inference_mode()
def concurrency(model: ChatGLMModel, dtype, streams: int, prompt_tokens: int,
                new_tokens: int, prefill_tokens: int | None = None) -> ConcurrencyResult:
    """``streams`` greedy sequences submitted together, each producing ``new_tokens``."""
    cfg = model.config
    batch = ContinuousBatch(model, dtype, streams, prompt_tokens + new_tokens + 1,
                            prefill_tokens=prefill_tokens)
    gen = GenerationConfig(max_new_tokens=new_tokens)
    t0 = time.perf_counter()
    seqs = [batch.submit(_prompt(cfg, prompt_tokens, i), gen) for i in range(streams)]
    times, full_steps = _run(batch, seqs)
    end = time.perf_counter()
    total = sum(len(t) for t in times.values())
    ttft = [t[0] - t0 for t in times.values()]
    speeds = [(len(t) - 1) / (t[-1] - t[0]) for t in times.values() if len(t) > 1 and
              t[-1] > t[0]]
    gaps = [b - a for t in times.values() for a, b in zip(t, t[1:], strict=False)]
    full_steps.sort()
    step = full_steps[len(full_steps) // 2] if full_steps else 0.0
    return ConcurrencyResult(streams, total / (end - t0), sum(speeds) / max(len(speeds), 1),
                             sum(ttft) / len(ttft), max(ttft), max(gaps, default=0.0), step)


@torch.inference_mode()
def join_gap(model: ChatGLMModel, dtype, long_tokens: int, prefill_tokens: int | None = None,
             warm_tokens: int = 3) -> JoinResult:
    """One stream decodes; a ``long_tokens`` prompt joins. How long does the stream wait?"""
    cfg = model.config
    batch = ContinuousBatch(model, dtype, 2, long_tokens + 64, prefill_tokens=prefill_tokens)
    running = batch.submit(_prompt(cfg, 16, 0), GenerationConfig(max_new_tokens=48))
    stamps = []
    while len(running.output) < warm_tokens:
        batch.step()
        stamps.append(time.perf_counter())
    decode_gap = stamps[-1] - stamps[-2]
    t0 = time.perf_counter()
    joining = batch.submit(_prompt(cfg, long_tokens, 1), GenerationConfig(max_new_tokens=1))
    last, worst, steps = stamps[-1], 0.0, 0
    while not joining.output:
        batch.step()
        steps += 1
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    prefill_s = time.perf_counter() - t0
    running.cancel()
    batch.close()
    return JoinResult(long_tokens, decode_gap, worst, steps, prefill_s)


def run(model: ChatGLMModel, dtype, levels: list[int], prompt_tokens: int = 32,
        new_tokens: int = 16, join_tokens: int = 1000, prefill_tokens: int | None = None,
        log=print) -> BatchBench:
    """Every concurrency level in turn, then the join-gap measurement (unless 0 tokens)."""
    res = BatchBench(prompt_tokens, new_tokens)
    concurrency(model, dtype, 1, 8, 2)  # first-call overheads out of the way
    for n in levels:
        log(f"{n} stream(s) of {prompt_tokens}-token prompts, {new_tokens} new tokens each...")
        res.levels.append(concurrency(model, dtype, n, prompt_tokens, new_tokens,
                                      prefill_tokens))
        log(f"  {res.levels[-1]}")  # each result as soon as it is known
    if join_tokens:
        log(f"a {join_tokens}-token prompt joins a running stream...")
        res.join = join_gap(model, dtype, join_tokens, prefill_tokens)
        log(f"  {res.join}")
    return res


def _or_dash(seconds: float) -> str:
    """A step time, or "-" when no step had every stream decoding (raise --decode-tokens)."""
    return f"{seconds:.3f}" if seconds else "-"


def print_table(r: BatchBench) -> None:
    print(f"\ncontinuous batching: {r.prompt_tokens}-token prompts, {r.new_tokens} new tokens "
          "per stream, greedy")
    print("  streams  aggregate tok/s  per-stream tok/s  TTFT mean/max s  worst gap s  "
          "all-decoding step s")
    for x in r.levels:
        print(f"  {x.streams:7d}  {x.aggregate_tokens_per_s:15.2f}  "
              f"{x.stream_tokens_per_s:16.2f}  {x.ttft_s_mean:7.2f}/{x.ttft_s_max:<7.2f}  "
              f"{x.worst_gap_s:11.2f}  {_or_dash(x.decode_step_s):>19}")
    if r.join:
        j = r.join
        print(f"  a {j.prompt_tokens}-token prompt joining a running stream: its usual gap "
              f"{j.decode_gap_s:.2f} s, worst gap {j.worst_gap_s:.2f} s (prefill spread over "
              f"{j.prefill_steps} steps, {j.prefill_s:.1f} s to its first token)")
