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
from .generate import GenerationConfig, GenerationResponse, new_cache
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
        self._lock = threading.RLock()  # one generation at a time owns the cache
        self._cache: KVCache | None = None

    def describe(self) -> str:
        """One line for start-up: what runs where, and why."""
        line = f"{self.path}: {self.precision} weights on {self.device}"
        if self.precision in ("int8", "int4"):
            line += f", {str(self.dtype).removeprefix('torch.')} activations"
        return line + (f" ({self.choice})" if self.choice else "")

    # -- low level -------------------------------------------------------------------------
    def cache(self, batch_size: int = 1) -> KVCache:
        """The session's KV cache, allocated once (grown in steps) and reused across calls."""
        if self._cache is None:
            self._cache = new_cache(self.model, batch_size, self.max_context, self.dtype)
        return self._cache

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
    def generate(self, ids, **gen) -> list[int] | list[list[int]]:
        """New token ids (ending with <eop> if generation stopped there).

        ``ids`` is one prompt (list of ints) or a batch (list of lists); a batch returns, for
        each prompt, exactly the tokens it gets alone.
        """
        cfg = gen if isinstance(gen, GenerationConfig) else make_generation_config(**gen)
        single = bool(ids) and isinstance(ids[0], int)
        prompts = [list(ids)] if single else [list(p) for p in ids]
        with self._lock:
            if len(prompts) == 1:
                out = _generate(self.model, prompts, cfg, self.cache(), self.dtype,
                                self.tokenizer.vocab_size)
            else:
                longest = max(len(p) for p in prompts)
                cache = new_cache(self.model, len(prompts),
                                  min(self.max_context, longest + max(cfg.budget(1), 1)),
                                  self.dtype)
                out = _generate(self.model, prompts, cfg, cache, self.dtype,
                                self.tokenizer.vocab_size)
        return out[0] if single else out

    def stream_generate(self, ids: list[int], gen: GenerationConfig | None = None,
                        **kwargs) -> Iterator[GenerationResponse]:
        """Yield ``GenerationResponse`` steps (text deltas) for one prompt."""
        gen = gen or make_generation_config(**kwargs)
        with self._lock:
            yield from _stream_generate(self.model, self.tokenizer, list(ids), gen,
                                        self.cache(), self.dtype)

    # -- chat ------------------------------------------------------------------------------
    def chat_stream(self, query: str, history=None, gen: GenerationConfig | None = None,
                    fitted: chatfmt.FittedPrompt | None = None,
                    **kwargs) -> Iterator[ChatStep]:
        """Stream one chat round; old rounds that do not fit the context budget are dropped.

        ``fitted``: the result of ``fit_chat`` for these arguments, when the caller has it
        already (the prompt is then not tokenized again).
        """
        gen = gen or make_generation_config(CHAT_DEFAULTS, **kwargs)
        history = chatfmt.normalize_history(history)
        fitted = fitted or self.fit_chat(query, history, gen)
        raw = ""
        for step in self.stream_generate(fitted.ids, gen):
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
