"""Train the built-in demo model from scratch: tokenizer, then a small ChatGLM-6B.

    nice -n 19 python -m localglm.demo.train            # writes localglm/demo/chatglm-6b-demo/

Everything is seeded and runs on the CPU with a fixed number of threads, so the same PyTorch
and sentencepiece versions give the same files. The model is the ChatGLM-6B architecture
(same blocks, 2-D positions, prompt format) at small width, trained with localglm's own
training forward (``localglm.finetune.forward``): the loss covers the answers and ``<eop>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...config import ModelConfig
from ...finetune import data
from ...finetune.forward import collate, loss_sum
from ...finetune.train import lr_factor
from ...model import ChatGLMModel
from ...tokenizer import ChatGLMTokenizer
from .. import MODEL_DIR
from . import corpus, spm

WEIGHTS_FILE = "model.safetensors"  # official tensor names, float16


@dataclass
class DemoConfig:
    """Everything that decides the demo model. Defaults are what the committed files used."""

    seed: int = 20230314  # ChatGLM-6B's release date
    vocab_size: int = 4000  # asked of sentencepiece; the small corpus supports fewer pieces
    hidden_size: int = 192
    num_layers: int = 4
    num_attention_heads: int = 6  # head_dim 32: two 16-wide rotary halves (2-D positions)
    max_sequence_length: int = 2048
    epochs: int = 20
    lr: float = 2e-3
    min_lr_factor: float = 0.05  # cosine decay ends at lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.1
    batch_tokens: int = 6144  # padded tokens per optimizer step
    init_std: float = 0.02
    variants: int = 1  # rewordings of each phrasing per epoch
    per_topic: int = 2  # question frames each topic is put in per epoch
    multi_share: float = 0.5  # share of the phrasings also asked after earlier rounds
    noise: float = 0.0  # share of single-round questions with 1-2 tokens dropped/swapped/added
    threads: int = 1  # one thread: fastest per core on a shared machine, and reproducible


def model_config(cfg: DemoConfig, tok: ChatGLMTokenizer) -> dict:
    """config.json in the official layout (same keys as THUDM/chatglm-6b's)."""
    return {
        "architectures": ["ChatGLMModel"],
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "mask_token_id": tok.mask_id,
        "gmask_token_id": tok.gmask_id,
        "pad_token_id": tok.pad_id,
        "hidden_size": cfg.hidden_size,
        "inner_hidden_size": 4 * cfg.hidden_size,
        "layernorm_epsilon": 1e-05,
        "max_sequence_length": cfg.max_sequence_length,
        "model_type": "chatglm",
        "num_attention_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_layers,
        "position_encoding_2d": True,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": tok.vocab_size,
    }


def init_weights(model: ChatGLMModel, std: float) -> None:
    """GPT-style init: normal weights, zero biases, unit LayerNorms."""
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, std=std)


def encode_epoch(tok, intents, cfg: DemoConfig, epoch: int) -> list[data.Encoded]:
    exs = corpus.examples(intents, cfg.seed + epoch, cfg.variants, cfg.per_topic,
                          cfg.multi_share)
    limits = data.Limits(max_seq_len=cfg.max_sequence_length)
    rng = random.Random(cfg.seed * 1000 + epoch)
    out = []
    for e in exs:
        enc = data.encode(tok, data.Example(e.query, e.answer, list(e.history)), limits)
        if not e.history and rng.random() < cfg.noise:
            enc = add_noise(enc, rng, range(5, tok.mask_id))
        out.append(enc)
    return out


def add_noise(enc: data.Encoded, rng: random.Random, pieces: range) -> data.Encoded:
    """Drop, replace or insert 1-2 question tokens, so that a word the model never saw (or a
    missing one) does not decide the answer on its own."""
    question = enc.ids[:enc.context - 1]  # the prompt before [gMASK]
    for _ in range(rng.randint(1, 2)):
        op, i = rng.randrange(3), rng.randrange(len(question) + 1)
        if op == 0 and len(question) > 2 and i < len(question):
            del question[i]
        elif op == 1 and i < len(question):
            question[i] = rng.choice(pieces)
        else:
            question.insert(i, rng.choice(pieces))
    ids = question + enc.ids[enc.context - 1:]
    return data.Encoded(ids, len(question) + 1, enc.truncated)


def batches(encoded: list[data.Encoded], budget: int, rng: random.Random):
    """Similar lengths together (little padding), at most ``budget`` padded tokens each."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].ids), i))
    out, cur = [], []
    for i in order:
        width = len(encoded[i].ids)  # sorted: the newest is the longest
        if cur and (len(cur) + 1) * width > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return [[encoded[i] for i in b] for b in out]


def train_model(model: ChatGLMModel, tok, intents, cfg: DemoConfig, max_steps=None,
                log=print) -> list[float]:
    """AdamW over all weights; returns the mean loss of each epoch."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    rng = random.Random(cfg.seed)
    steps_per_epoch = len(batches(encode_epoch(tok, intents, cfg, 0), cfg.batch_tokens, rng))
    total = max_steps or steps_per_epoch * cfg.epochs
    step, losses, start = 0, [], time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        tot, count = 0.0, 0
        for group in batches(encode_epoch(tok, intents, cfg, epoch), cfg.batch_tokens, rng):
            f = lr_factor(step, cfg.warmup_steps, total, "cosine")
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (cfg.min_lr_factor + (1 - cfg.min_lr_factor) * f)
            tb = collate(group, model.config, torch.device("cpu"))
            loss = loss_sum(model, tb, torch.float32)
            opt.zero_grad(set_to_none=True)
            (loss / tb.n_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot, count, step = tot + loss.item(), count + tb.n_tokens, step + 1
            if step >= total:
                break
        losses.append(tot / max(count, 1))
        log(f"epoch {epoch + 1}/{cfg.epochs}: step {step}, loss {losses[-1]:.4f}, "
            f"{time.perf_counter() - start:.0f} s")
        if step >= total:
            break
    model.eval()
    return losses


def save(model: ChatGLMModel, config: dict, spm_model: bytes, out_dir: Path,
         meta: dict) -> None:
    """Write the model directory through a temporary one, so it is never half-written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=out_dir.parent))
    try:
        state = {k: v.detach().to(torch.float16).contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        spm.write(spm_model, tmp)
        (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(cfg: DemoConfig, out_dir: Path, max_steps: int | None = None, log=print) -> dict:
    """Train the tokenizer and the model, write ``out_dir``; returns the training summary."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    start = time.perf_counter()
    intents = corpus.load_intents()
    spm_model = spm.train(corpus.texts(intents) + _prompt_texts(), cfg.vocab_size)
    with tempfile.TemporaryDirectory() as d:
        spm.write(spm_model, Path(d))
        tok = ChatGLMTokenizer.from_dir(d)
    config = model_config(cfg, tok)
    model = ChatGLMModel(ModelConfig.from_dict(config))
    init_weights(model, cfg.init_std)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tokenizer: {tok.vocab_size} pieces; model: {n_params / 1e6:.2f} M parameters")
    losses = train_model(model, tok, intents, cfg, max_steps, log)
    meta = {"config": asdict(cfg), "parameters": n_params, "epoch_losses": losses,
            "train_seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__}
    save(model, config, spm_model, out_dir, meta)
    return meta


def _prompt_texts() -> list[str]:
    """The multi-round prompt's own words, so they get pieces of their own."""
    return [f"[Round {i}]\n问：\n答：" for i in range(8)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m localglm.demo.train",
                                description="Train the built-in demo model from scratch.")
    p.add_argument("-o", "--output", type=Path, default=MODEL_DIR,
                   help=f"model directory to write (default: {MODEL_DIR})")
    p.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="stop early (for timing)")
    p.add_argument("--threads", type=int, default=DemoConfig.threads,
                   help="torch threads (default: 1)")
    p.add_argument("--noise", type=float, default=DemoConfig.noise,
                   help="share of single-round questions with 1-2 tokens dropped, swapped or "
                   f"added (default: {DemoConfig.noise})")
    args = p.parse_args(argv)
    cfg = DemoConfig(epochs=args.epochs, threads=args.threads, noise=args.noise)
    meta = build(cfg, args.output, args.max_steps, log=lambda s: print(s, flush=True))
    size = (args.output / WEIGHTS_FILE).stat().st_size
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB of weights) in "
          f"{meta['train_seconds']:.0f} s ({math.floor(meta['train_seconds'] / 60)} min)")
    return 0
