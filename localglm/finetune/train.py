"""The training loop: AdamW on the adapter only, accumulation, schedule, checkpoints, resume.

Micro-batches come from one seeded stream (a fresh shuffle per epoch), and optimizer step ``s``
always uses micro-batches ``[s * grad_accum, (s + 1) * grad_accum)`` of it, so resuming from a
checkpoint continues with exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import LocalGLMError
from . import lora, ptuning
from .data import Dataset
from .forward import collate, loss_sum, mean_loss

STATE_NAME = "trainer_state.pt"
DEFAULT_LR = {"lora": 2e-4, "ptuning": 2e-2}  # ptuning: the official train.sh value


@dataclass
class TrainConfig:
    method: str = "lora"  # "lora" or "ptuning"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = lora.DEFAULT_TARGETS
    pre_seq_len: int = 128
    prefix_projection: bool = False
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR of the method
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "cosine"  # "cosine", "linear" or "constant" after the warmup
    max_grad_norm: float = 1.0  # 0 = no clipping
    save_steps: int = 0  # 0 = only the final adapter
    eval_steps: int = 0  # 0 = evaluate at the end only
    seed: int = 42
    gradient_checkpointing: bool = True
    progress: bool = True
    base_model: str = ""  # recorded in the adapter's config

    def __post_init__(self):
        if self.method not in DEFAULT_LR:
            raise LocalGLMError(f"unknown method {self.method!r}; use lora or ptuning")
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise LocalGLMError(f"unknown scheduler {self.scheduler!r}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise LocalGLMError(f"{name} must be >= 1")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean training loss of each step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    out_dir: str = ""


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warmup to 1, then cosine/linear decay to 0 at ``total`` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress


def micro_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of example-index batches, reshuffled (seeded) every epoch."""
    for epoch in itertools.count():
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, batch_size):
            yield order[i:i + batch_size]


def setup_adapter(model, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Add the trainable part (LoRA layers or a prefix encoder); return its parameters."""
    if cfg.method == "lora":
        lora.apply_lora(model, cfg.target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        params = lora.lora_parameters(model)
    else:
        enc = ptuning.add_prefix_encoder(model, cfg.pre_seq_len, cfg.prefix_projection)
        params = list(enc.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def save_adapter_files(model, out_dir: Path, cfg: TrainConfig) -> None:
    if cfg.method == "lora":
        lora.save_adapter(model, out_dir, {"base_model_name_or_path": cfg.base_model})
    else:
        ptuning.save_ptuning(model, out_dir)


class Trainer:
    """Holds the model, optimizer and schedule of one run; ``run`` trains to the last step."""

    def __init__(self, llm, train_data: Dataset, out_dir, cfg: TrainConfig,
                 eval_data: Dataset | None = None):
        if len(train_data) == 0:
            raise LocalGLMError("the training data holds no examples")
        self.llm, self.model, self.dtype = llm, llm.model, llm.dtype
        self.data, self.eval_data, self.cfg = train_data, eval_data, cfg
        self.out_dir = Path(out_dir)
        self.device = self.model.transformer.word_embeddings.weight.device
        torch.manual_seed(cfg.seed)
        self.params = setup_adapter(self.model, cfg)
        if cfg.method == "ptuning":
            llm.reset_cache()  # the inference cache must now make room for the prefix
        self.total = total_steps(len(train_data), cfg)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup_steps, self.total, cfg.scheduler))
        # float16 activations can underflow small gradients: scale the loss (fp32 adapters).
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.dtype == torch.float16)
        self.step = 0
        self.result = TrainResult(0, out_dir=str(self.out_dir))

    def train_step(self, batches: list[list[int]]) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns their mean loss."""
        cfg = self.cfg
        tbs = [collate([self.data.examples[i] for i in idx], self.model.config, self.device)
               for idx in batches]
        n_tokens = max(1, sum(tb.n_tokens for tb in tbs))
        total = 0.0
        for tb in tbs:
            # Divide by the window's token count: the same gradient as one big batch.
            loss = loss_sum(self.model, tb, self.dtype, cfg.gradient_checkpointing,
                            ptuning.OFFICIAL_DROPOUT if cfg.method == "ptuning" else 0.0)
            self.scaler.scale(loss / n_tokens).backward()
            total += float(loss.detach())
        self.scaler.unscale_(self.opt)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return total / n_tokens

    def run(self) -> TrainResult:
        cfg = self.cfg
        stream = micro_batches(len(self.data), cfg.batch_size, cfg.seed)
        stream = itertools.islice(stream, self.step * cfg.grad_accum, None)  # resumed steps
        bar = _progress(self.total, self.step, cfg.progress)
        self.model.train()
        try:
            while self.step < self.total:
                loss = self.train_step([next(stream) for _ in range(cfg.grad_accum)])
                self.step += 1
                self.result.losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.sched.get_last_lr()[0]:.2e}")
                bar.update()
                self._periodic(bar)
        finally:
            bar.close()
            self.model.eval()
        save_adapter_files(self.model, self.out_dir, cfg)
        if self.eval_data is not None and (not self.result.eval_losses
                                           or self.result.eval_losses[-1][0] != self.step):
            self.evaluate()
        self.result.steps = self.step
        return self.result

    def _periodic(self, bar) -> None:
        cfg = self.cfg
        if cfg.eval_steps and self.eval_data is not None and self.step % cfg.eval_steps == 0:
            bar.write(f"step {self.step}: eval loss {self.evaluate():.4f}")
        if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total:
            bar.write(f"step {self.step}: saved {self.save_checkpoint()}")

    def evaluate(self) -> float:
        loss = mean_loss(self.model, self.eval_data.examples, self.dtype, self.cfg.batch_size)
        self.result.eval_losses.append((self.step, loss))
        return loss

    def save_checkpoint(self) -> Path:
        """``OUT/checkpoint-STEP``: the adapter + optimizer/schedule state, written atomically."""
        final = self.out_dir / f"checkpoint-{self.step}"
        tmp = self.out_dir / f".checkpoint-{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_adapter_files(self.model, tmp, self.cfg)
            torch.save(self._state(), tmp / STATE_NAME)
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": self.step, "total_steps": self.total, "losses": self.result.losses,
                 "eval_losses": self.result.eval_losses, "config": _jsonable(self.cfg)},
                indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _state(self) -> dict:
        return {"step": self.step, "method": self.cfg.method, "total_steps": self.total,
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "losses": list(self.result.losses),
                "rng": torch.get_rng_state()}  # LoRA dropout draws from it

    def resume(self, ckpt_dir) -> None:
        """Continue from a ``checkpoint-STEP`` directory of the same run settings."""
        ckpt_dir = Path(ckpt_dir)
        path = ckpt_dir / STATE_NAME
        if not path.exists():
            raise LocalGLMError(f"{ckpt_dir} is not a training checkpoint (no {STATE_NAME})")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["method"] != self.cfg.method:
            raise LocalGLMError(
                f"{ckpt_dir} was trained with --method {state['method']}, not {self.cfg.method}")
        _load_adapter_weights(self.model, ckpt_dir, self.cfg)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.result.losses = list(state["losses"])


def _load_adapter_weights(model, ckpt_dir: Path, cfg: TrainConfig) -> None:
    if cfg.method == "ptuning":
        ptuning.load_prefix_into(model, ckpt_dir)
        return
    saved = lora.read_adapter_tensors(ckpt_dir)
    mods = lora.lora_modules(model)
    if set(saved) != set(mods):
        raise LocalGLMError(f"{ckpt_dir} adapts other modules than --target-modules")
    with torch.no_grad():
        for name, m in mods.items():
            a, b = saved[name]["A"], saved[name]["B"]
            if a.shape != m.lora_A.weight.shape or b.shape != m.lora_B.weight.shape:
                raise LocalGLMError(f"{ckpt_dir}: LoRA rank differs from --lora-r {cfg.lora_r}")
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b)


def _jsonable(cfg: TrainConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step",
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def train(llm, train_data: Dataset, out_dir, cfg: TrainConfig | None = None,
          eval_data: Dataset | None = None, resume=None) -> TrainResult:
    """Train an adapter on ``llm`` (a ``LocalGLM``, changed in place) and save it to ``out_dir``.

    The final adapter lands in ``out_dir`` itself (LoRA: PEFT layout; P-Tuning: official
    layout), periodic checkpoints in ``out_dir/checkpoint-STEP``.
    """
    trainer = Trainer(llm, train_data, out_dir, cfg or TrainConfig(), eval_data)
    if resume is not None:
        trainer.resume(resume)
    return trainer.run()
