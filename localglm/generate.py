"""Generation: official 2-D positions, prefill, one-token decode, and the token loop.

Three layers, each built on the one before: ``generate_step`` yields token ids for a batch,
``stream_generate`` yields text as it is produced for one prompt, ``generate`` returns ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .cache import KVCache
from .errors import ContextTooLongError, LocalGLMError
from .model import AttentionLayout, ChatGLMModel
from .options import GenerationConfig
from .sampling import Processor, make_sampler, repetition_penalty, replace_invalid
from .streamer import TextStreamer


@dataclass
class PromptInfo:
    """Where the answer starts and which mask token sets its position."""

    context: int  # index of <sop>; tokens before it form the bidirectional context
    mask_position: int  # index of the first [gMASK] (else [MASK]): position of the answer

    def positions(self, start: int, end: int) -> list[list[int]]:
        """Official 2-D positions of tokens [start, end): [position ids, block position ids]."""
        pos, block = [], []
        for i in range(start, end):
            if i < self.context:
                pos.append(i)
                block.append(0)
            else:
                pos.append(self.mask_position)
                block.append(i - self.context + 1)
        return [pos, block]


def prompt_info(ids: list[int], cfg) -> PromptInfo:
    """Official rules: context ends at <sop>; the answer sits at [gMASK] (or [MASK])."""
    ctx = ids.index(cfg.bos_token_id) if cfg.bos_token_id in ids else len(ids)
    for mask_id in (cfg.gmask_token_id, cfg.mask_token_id):
        if mask_id in ids:
            return PromptInfo(ctx, ids.index(mask_id))
    return PromptInfo(ctx, max(ctx - 1, 0))


class Batch:
    """Left-padded prompts with their official positions, ready to be fed to the model."""

    def __init__(self, prompts: list[list[int]], cfg, device):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LocalGLMError("every prompt needs at least one token")
        self.cfg = cfg
        self.device = device
        self.infos = [prompt_info(p, cfg) for p in prompts]
        self.lengths = [len(p) for p in prompts]
        width = max(self.lengths)
        self.pad = [width - n for n in self.lengths]
        ids, pos = [], []
        for p, info, pad in zip(prompts, self.infos, self.pad, strict=True):
            ids.append([cfg.pad_token_id] * pad + list(p))
            rows = info.positions(0, len(p))
            pos.append([[0] * pad + r for r in rows])
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)  # (B, T)
        self.pos = torch.tensor(pos, dtype=torch.long, device=device)  # (B, 2, T)

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def layout(self, start: int, n: int, prefix_len: int) -> AttentionLayout:
        padded = any(self.pad)
        return AttentionLayout(
            start=start,
            kv_len=prefix_len + start + n,
            prefix_len=prefix_len,
            context=[pad + info.context for pad, info in zip(self.pad, self.infos, strict=True)],
            pad=list(self.pad) if padded else None,
        )

    def next_positions(self, index: int) -> torch.Tensor:
        """Positions (B, 2, 1) of the token at padded index ``index`` in every row."""
        rows = [info.positions(index - pad, index - pad + 1)
                for info, pad in zip(self.infos, self.pad, strict=True)]
        return torch.tensor(rows, dtype=torch.long, device=self.device)


def new_cache(model: ChatGLMModel, batch_size: int, max_len: int, dtype) -> KVCache:
    cfg = model.config
    devices = [layer.input_layernorm.weight.device for layer in model.transformer.layers]
    prefix = cfg.pre_seq_len or 0
    return KVCache(cfg.num_layers, batch_size, cfg.num_attention_heads, cfg.head_dim,
                   max_len + prefix, dtype, devices)


def prefill(model: ChatGLMModel, batch: Batch, cache: KVCache, dtype) -> torch.Tensor:
    """Run the prompts through the model, fill the cache; last-position logits (B, V)."""
    prefix = model.config.pre_seq_len or 0
    cache.reset(batch.ids.shape[0])
    cache.reserve(prefix + batch.width)
    if prefix:
        cache.load_prefix(model.prefix_kv(batch.ids.shape[0], dtype))
    layout = batch.layout(0, batch.width, prefix)
    return model(batch.ids, batch.pos, cache, layout, logits_at="last")[:, -1]


def decode_one_token(model: ChatGLMModel, batch: Batch, tokens: torch.Tensor, index: int,
                     cache: KVCache) -> torch.Tensor:
    """Feed one token per row (B, 1) at padded ``index``; logits (B, V)."""
    prefix = model.config.pre_seq_len or 0
    layout = batch.layout(index, 1, prefix)
    pos = batch.next_positions(index)
    return model(tokens, pos, cache, layout, logits_at="last")[:, -1]


class TokenPicker:
    """Turns logits (B, V) into the next token of every row, with one row group's settings.

    Holds the ids seen so far (for the repetition penalty) and its own random generator, so
    that a sequence sampled next to others draws exactly what it would draw alone.
    """

    def __init__(self, gen: GenerationConfig, prompts: torch.Tensor,
                 vocab_limit: int | None = None, processors: list[Processor] = ()):
        self.gen = gen
        self.vocab_limit = vocab_limit
        self.processors = list(processors)  # run after the repetition penalty, in order
        self.history = prompts.cpu()  # (B, T) ids so far
        generator = None
        if gen.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(gen.seed)
        self.sampler = make_sampler(0.0 if gen.greedy else gen.temperature, gen.top_p,
                                    gen.top_k, generator)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) -> tokens (B,) on CPU."""
        scores = replace_invalid(logits.float().cpu())
        if self.vocab_limit is not None and self.vocab_limit < scores.shape[-1]:
            scores[:, self.vocab_limit:] = float("-inf")
        if self.gen.repetition_penalty != 1.0:
            scores = repetition_penalty(scores, self.history, self.gen.repetition_penalty)
        for process in self.processors:
            scores = process(scores, self.history)
        token = self.sampler(scores)  # (B,)
        if self.gen.repetition_penalty != 1.0 or self.processors:
            self.history = torch.cat([self.history, token[:, None]], dim=1)
        return token


def step_budget(gen: GenerationConfig, prompt_len: int, room: int) -> int:
    """New tokens a prompt may get: its budget, capped by the ``room`` tokens of context."""
    steps = min(gen.budget(prompt_len), room - prompt_len)
    if steps < 0:
        raise ContextTooLongError(
            f"the prompt has {prompt_len} tokens; the context holds {room}")
    return steps


@torch.inference_mode()
def generate_step(model: ChatGLMModel, prompts: list[list[int]], gen: GenerationConfig,
                  cache: KVCache, dtype, vocab_limit: int | None = None,
                  processors: list[Processor] = ()) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) on CPU, until every row has finished.

    Rows that reached <eop> keep being fed <eop> (their output is ignored by the caller); a row
    never sees another row's tokens, so each gets exactly the tokens it would get alone.
    ``vocab_limit``: ids from here on are never picked (the real checkpoint's embedding has
    184 rows more than the tokenizer has pieces). ``processors`` run, in order, on the
    float32 scores (B, V) after the repetition penalty, just before sampling. The cache is
    borrowed for the whole generation: another generation using it meanwhile gets a
    ``CacheBusyError``.
    """
    cfg = model.config
    device = next(model.parameters()).device
    batch = Batch(prompts, cfg, device)
    limit = cache.max_len - (cfg.pre_seq_len or 0)
    steps = min(max(gen.budget(n) for n in batch.lengths), limit - batch.width)
    if steps < 0:
        raise ContextTooLongError(
            f"the prompt has {batch.width} tokens; the context holds {limit}")
    if steps == 0:
        return
    with cache.borrow():
        pick = TokenPicker(gen, batch.ids, vocab_limit, processors)
        logits = prefill(model, batch, cache, dtype)
        index = batch.width
        for step in range(steps):
            token = pick(logits)  # (B,)
            yield token
            if step == steps - 1:
                return
            logits = decode_one_token(model, batch, token[:, None].to(device), index, cache)
            index += 1


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model, with the most likely tokens."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


class LogprobRecorder:
    """A processor that keeps the log-probabilities of row 0's scores at each step; it must
    run before any processor that masks tokens, so that they are the model's own."""

    def __init__(self, top: int):
        self.top = top
        self._last: torch.Tensor | None = None

    def __call__(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        self._last = torch.log_softmax(scores[0], dim=-1)  # (V,)
        return scores

    def entry(self, token: int) -> TokenLogprob:
        lp = self._last
        top = torch.topk(lp, self.top) if self.top else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []
        return TokenLogprob(token, float(lp[token]), pairs)


@dataclass
class GenerationResponse:
    """One step of ``stream_generate``."""

    text: str  # new text since the previous step (may be empty)
    token: int | None  # the token of this step (None for the final flush)
    finish_reason: str | None = None  # "stop" (<eop> or stop string), "length", or None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0  # prefill speed, tokens/s
    generation_tps: float = 0.0  # decode speed, tokens/s
    # With GenerationConfig.logprobs: one entry per token generated since the previous step
    # (<eop> excluded).
    logprobs: list[TokenLogprob] | None = None


def stream_generate(model: ChatGLMModel, tokenizer, prompt: list[int], gen: GenerationConfig,
                    cache: KVCache | None = None, dtype=None,
                    tokens: Callable[[list[Processor]], Iterator[int]] | None = None
                    ) -> Iterator[GenerationResponse]:
    """Yield text as it is produced for one prompt; never a broken multi-byte character.

    ``tokens(processors)``: where the token ids come from (e.g. a sequence of a continuous
    batch), given the logits processors ``gen`` needs; by default the prompt is generated
    alone in ``cache``.

    Text that could be the start of a stop string is held back until it is known not to be.
    """
    from .tokenizer import StreamDecoder

    decoder = StreamDecoder(tokenizer)
    streamer = TextStreamer(stop=gen.stop)  # holds back a possible start of a stop string
    eos = model.config.eos_token_id
    budget = gen.budget(len(prompt))
    t0 = time.perf_counter()
    t_first = None
    n = 0
    text = ""

    def step(token, finish):
        piece = streamer.push(text, final=finish is not None)
        finish = "stop" if streamer.stopped else finish
        return _response(piece, token, finish, prompt, n, t0, t_first)

    processors, recorder = _processors(gen, tokenizer, len(prompt))
    pending = []  # logprobs of the tokens since the last response

    def with_logprobs(r: GenerationResponse) -> GenerationResponse:
        if recorder is not None:
            r.logprobs = pending.copy()
            pending.clear()
        return r

    finish = "length"  # if the loop ends without <eop>, the context is full
    if tokens is None:
        source = (int(t[0]) for t in generate_step(model, [prompt], gen, cache, dtype,
                                                   tokenizer.vocab_size, processors))
    else:
        source = tokens(processors)
    try:
        for tok in source:
            t_first = t_first or time.perf_counter()
            n += 1
            if tok == eos:
                finish = "stop"
                break
            if recorder is not None:
                pending.append(recorder.entry(tok))
            text += decoder.add(tok)
            if n >= budget:
                break
            r = step(tok, None)
            yield with_logprobs(r)
            if r.finish_reason:
                return
        text += decoder.flush()
        yield with_logprobs(step(None, finish))
    finally:
        source.close()  # a batch sequence leaves its batch, a solo generation ends


def _processors(gen: GenerationConfig, tokenizer, prompt_len: int):
    """The extra logits processors ``gen`` asks for, and the logprob recorder among them."""
    processors, recorder = [], None
    if gen.logprobs is not None:  # first: the log-probabilities are the model's own
        recorder = LogprobRecorder(gen.logprobs)
        processors.append(recorder)
    if gen.json_object:
        from .json_mode import JSONObjectProcessor

        processors.append(JSONObjectProcessor(tokenizer, prompt_len))
    return processors, recorder


def _response(text, token, finish, prompt, n, t0, t_first) -> GenerationResponse:
    now = time.perf_counter()
    t_first = t_first or now
    return GenerationResponse(
        text=text, token=token, finish_reason=finish, prompt_tokens=len(prompt),
        generation_tokens=n,
        prompt_tps=len(prompt) / max(t_first - t0, 1e-9),
        generation_tps=(n - 1) / (now - t_first) if n > 1 and now > t_first else 0.0,
    )


def generate(model: ChatGLMModel, prompts: list[list[int]], gen: GenerationConfig,
             cache: KVCache, dtype, vocab_limit: int | None = None) -> list[list[int]]:
    """New token ids of each prompt, each ending with <eop> if generation stopped there."""
    eos = model.config.eos_token_id
    budgets = [gen.budget(len(p)) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    done = [b == 0 for b in budgets]
    for token in generate_step(model, prompts, gen, cache, dtype, vocab_limit):
        for r, tok in enumerate(token.tolist()):
            if done[r]:
                continue
            out[r].append(tok)
            done[r] = tok == eos or len(out[r]) >= budgets[r]
        if all(done):
            break
    return out
