"""The public Python API: ``localglm.load`` and the ``LocalGLM`` object it returns.

The CLI, the server and the web UI all go through this object; none of them calls the model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from . import chat as chatfmt
from .cache import KVCache
from .config import ModelConfig
from .errors import LocalGLMError
from .generate import GenerationConfig, GenerationResponse, generate_step, new_cache
from .generate import generate as _generate
from .generate import stream_generate as _stream_generate
from .model import AttentionLayout, ChatGLMModel
from .options import CHAT_DEFAULTS
from .tokenizer import ChatGLMTokenizer

_GEN_FIELDS = {f.name for f in fields(GenerationConfig)}


def make_generation_config(defaults: dict | None = None, **kwargs) -> GenerationConfig:
    """GenerationConfig from official-style keyword arguments (num_beams=1 is accepted)."""
    kwargs = {**(defaults or {}), **kwargs}
    if kwargs.pop("num_beams", 1) != 1:
        raise LocalGLMError("beam search is not supported; use num_beams=1")
    kwargs.pop("logits_processor", None)  # the official guard is always applied
    unknown = set(kwargs) - _GEN_FIELDS
    if unknown:
        raise LocalGLMError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    return GenerationConfig(**kwargs)


@dataclass
class ChatStep:
    """One step of ``LocalGLM.chat_stream``."""

    delta: str  # new raw text since the previous step
    response: str  # the answer so far, post-processed like the official chat
    history: chatfmt.History  # history including this round (with the answer so far)
    dropped: int  # oldest rounds left out of the prompt to fit the context budget
    finish_reason: str | None  # None while streaming; "stop" or "length" at the end
    stats: GenerationResponse | None = None  # token counts and speeds of this step


class LocalGLM:
    """A loaded ChatGLM-6B with its tokenizer, ready to generate and chat."""

    def __init__(self, model: ChatGLMModel, tokenizer: ChatGLMTokenizer, dtype: torch.dtype,
                 max_context: int | None = None, precision: str = "", path: str = "",
                 choice: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.dtype = dtype  # compute dtype of activations and the KV cache
        self.precision = precision
        self.path = path
        self.choice = choice  # why this precision was picked (precision="auto")
        self.max_context = max_context or self.config.max_sequence_length
        self.device = self.model.transformer.word_embeddings.weight.device
        # One model call at a time (several threads may stream): each generation owns its KV
        # cache, so the lock is taken per step, never held while a stream is suspended.
        self._lock = threading.RLock()
        self._cache: KVCache | None = None  # the session cache, lent to one generation at once

    def describe(self) -> str:
        """One line for start-up: what runs where, and why."""
        line = f"{self.path}: {self.precision} weights on {self.device}"
        if self.precision in ("int8", "int4"):
            line += f", {str(self.dtype).removeprefix('torch.')} activations"
            kernels = self.kernels()
            if kernels:
                line += f"; {kernels}"
        return line + (f" ({self.choice})" if self.choice else "")

    def kernels(self) -> str:
        """Which kernel the quantized layers run for one token and for a long prompt (every
        layer shape: `localglm bench`)."""
        from .quantize import QuantizedLinear

        blocks = self.model.transformer.layers
        layer = next((m for m in blocks[0].modules() if isinstance(m, QuantizedLinear)), None)
        if layer is None:
            return ""
        picks = {}
        for rows, what in ((1, "decode"), (512, "prompts")):
            x = torch.empty(rows, layer.in_features, dtype=self.dtype, device=layer.weight.device)
            picks.setdefault(layer.describe_kernel(x), []).append(what)
        return ", ".join(f"{k} ({' and '.join(v)})" for k, v in picks.items())

    # -- low level -------------------------------------------------------------------------
    def cache(self, batch_size: int = 1) -> KVCache:
        """The session's KV cache, allocated once (grown in steps) and reused across calls."""
        if self._cache is None:
            self._cache = new_cache(self.model, batch_size, self.max_context, self.dtype)
        return self._cache

    def reset_cache(self) -> None:
        """Drop the session's KV cache; the next generation allocates a new one.

        Call it after changing what the cache must hold (e.g. a P-Tuning prefix was added), or
        to give its memory back. A generation still running keeps the cache it started with.
        """
        with self._lock:
            self._cache = None

    def _free_cache(self) -> KVCache:
        """The session cache if no unfinished generation holds it, else a cache of its own
        (two streams consumed in turns on one thread must not share keys)."""
        cache = self.cache()
        if cache.busy:
            cache = new_cache(self.model, 1, self.max_context, self.dtype)
        return cache

    def _locked(self, steps: Iterator) -> Iterator:
        """Run each step of ``steps`` under the model lock, released while the caller waits."""
        try:
            while True:
                with self._lock:
                    try:
                        item = next(steps)
                    except StopIteration:
                        return
                yield item
        finally:
            with self._lock:
                steps.close()  # releases the generation's cache

    def _solo_tokens(self, ids: list[int], gen: GenerationConfig,
                     processors=()) -> Iterator[int]:
        """Token ids of one prompt generated alone; the cache is picked when it starts."""
        def steps():
            cache = self._free_cache()  # runs under the lock, with the first step
            for token in generate_step(self.model, [ids], gen, cache, self.dtype,
                                       self.tokenizer.vocab_size, processors):
                yield int(token[0])
        return self._locked(steps())

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits (len(ids), vocab) of a full forward with official positions and mask."""
        from .generate import Batch

        with self._lock:
            batch = Batch([list(ids)], self.config, self.device)
            cache = new_cache(self.model, 1, max(len(ids), 1), self.dtype)
            prefix = self.config.pre_seq_len or 0
            if prefix:
                cache.load_prefix(self.model.prefix_kv(1, self.dtype))
            layout = batch.layout(0, batch.width, prefix)
            return self.model(batch.ids, batch.pos, cache, layout, logits_at="all")[0].cpu()

    @torch.inference_mode()
    def embed(self, ids: list[int]) -> torch.Tensor:
        """Final hidden states (len(ids), hidden) in float32."""
        from .generate import Batch

        with self._lock:
            batch = Batch([list(ids)], self.config, self.device)
            cache = new_cache(self.model, 1, len(ids), self.dtype)
            layout = AttentionLayout(0, len(ids), context=[len(ids)])
            return self.model(batch.ids, batch.pos, cache, layout, return_hidden=True)[0].float()

    # -- generation ------------------------------------------------------------------------
    def batch(self, max_batch: int = 4, prefill_tokens: int | None = None, on_change=None):
        """A ``ContinuousBatch`` on this model: up to ``max_batch`` sequences decode together
        (see ``localglm.batch``); pass it to ``stream_generate``/``chat_stream``."""
        from .batch import ContinuousBatch

        return ContinuousBatch(self.model, self.dtype, max_batch, self.max_context,
                               self.tokenizer.vocab_size, prefill_tokens, self._lock, on_change)

    def generate(self, ids, max_batch: int = 8, **gen) -> list[int] | list[list[int]]:
        """New token ids (ending with <eop> if generation stopped there).

        ``ids`` is one prompt (list of ints) or a batch (list of lists). A batch is generated
        with continuous batching, ``max_batch`` sequences at a time, and returns for each
        prompt exactly the tokens it gets alone (greedy, or sampled with the same seed).
        """
        cfg = gen if isinstance(gen, GenerationConfig) else make_generation_config(**gen)
        single = bool(ids) and isinstance(ids[0], int)
        prompts = [list(ids)] if single else [list(p) for p in ids]
        if single:
            with self._lock:
                return _generate(self.model, prompts, cfg, self._free_cache(), self.dtype,
                                 self.tokenizer.vocab_size)[0]
        batch = self.batch(min(max_batch, max(len(prompts), 1)))
        seqs = [batch.submit(p, cfg) for p in prompts]
        batch.run()
        for seq in seqs:
            if seq.error is not None:
                raise seq.error
        return [seq.output for seq in seqs]

    def stream_generate(self, ids: list[int], gen: GenerationConfig | None = None,
                        batch=None, **kwargs) -> Iterator[GenerationResponse]:
        """Yield ``GenerationResponse`` steps (text deltas) for one prompt.

        batch: a ``ContinuousBatch`` (``LocalGLM.batch``) to decode in, next to other
        sequences; by default the prompt is generated alone.
        """
        gen = gen or make_generation_config(**kwargs)
        ids = list(ids)

        def tokens(processors):
            if batch is None:
                return self._solo_tokens(ids, gen, processors)
            if processors:
                raise LocalGLMError("logprobs and JSON mode need a generation of their own, "
                                    "not a sequence of a continuous batch")
            return iter(batch.submit(ids, gen))

        yield from _stream_generate(self.model, self.tokenizer, ids, gen, tokens=tokens)

    # -- chat ------------------------------------------------------------------------------
    def chat_stream(self, query: str, history=None, gen: GenerationConfig | None = None,
                    fitted: chatfmt.FittedPrompt | None = None, batch=None,
                    **kwargs) -> Iterator[ChatStep]:
        """Stream one chat round; old rounds that do not fit the context budget are dropped.

        ``fitted``: the result of ``fit_chat`` for these arguments, when the caller has it
        already (the prompt is then not tokenized again). ``batch``: a ``ContinuousBatch`` to
        answer in (see ``stream_generate``).
        """
        gen = gen or make_generation_config(CHAT_DEFAULTS, **kwargs)
        history = chatfmt.normalize_history(history)
        fitted = fitted or self.fit_chat(query, history, gen)
        raw = ""
        for step in self.stream_generate(fitted.ids, gen, batch=batch):
            raw += step.text
            response = chatfmt.process_response(raw)
            new_history = history + [(query, response)]
            yield ChatStep(step.text, response, new_history, fitted.dropped,
                           step.finish_reason, step)

    def fit_chat(self, query: str, history, gen: GenerationConfig) -> chatfmt.FittedPrompt:
        """The prompt ``chat_stream`` runs: the oldest rounds that do not fit the context
        budget (``gen.max_length``, at most the context) are left out."""
        budget = min(self.max_context, gen.max_length or self.max_context)
        reserve = gen.max_new_tokens if gen.max_new_tokens is not None else 1
        return chatfmt.fit_prompt(self.tokenizer, query, chatfmt.normalize_history(history),
                                  budget, reserve)

    def chat(self, query: str, history=None, **gen) -> tuple[str, chatfmt.History]:
        """Like the official ``model.chat``: returns (response, history + [(query, response)])."""
        *_, last = self.chat_stream(query, history, **gen)
        return last.response, last.history

    def stream_chat(self, query: str, history=None, **gen):
        """Like the official ``model.stream_chat``: yields (response_so_far, history)."""
        last = None
        for step in self.chat_stream(query, history, **gen):
            if step.response != last or step.finish_reason:
                last = step.response
                yield step.response, step.history
