"""Peak memory of LoRA training on a full-size ChatGLM-6B with int4 weights.

The model has the real shapes (hidden 4096, 28 layers, MLP 16384, vocab 130528, 32 heads) and
random weights, built layer by layer directly in int4 form, so no float copy of the 6B weights
ever exists. It then runs a few LoRA training steps (batch 1, 256 tokens, gradient
checkpointing) and prints the resident memory (RSS) at each stage and its peak.

    python benchmarks/finetune_memory.py                        # 2 steps, float32 compute
    python benchmarks/finetune_memory.py --compute-dtype bfloat16 --layers 4 --steps 1

float32 compute is the default because on CPUs without native bf16 (AVX2) PyTorch's bf16
backward matmul through a frozen weight (grad @ W) is 17-80x slower than the forward.

The int4 layers are ``localglm.quantize.QuantizedLinear`` (group-wise int4) filled with random
nibbles and constant group scales; without that module, a minimal packed-int4 linear defined
here. Either way no float copy of a block's weights is made.
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localglm.config import ModelConfig  # noqa: E402
from localglm.finetune import lora  # noqa: E402
from localglm.finetune.data import Encoded  # noqa: E402
from localglm.finetune.forward import collate, loss_sum  # noqa: E402
from localglm.model import ChatGLMModel, GLMBlock, RotaryTable  # noqa: E402

GIB = 1 << 30
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
           "mlp.dense_4h_to_h")


def rss() -> float:
    return psutil.Process().memory_info().rss / GIB


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB -> GiB


class RSSSampler:
    """Highest RSS seen while active (ru_maxrss only ever grows, this can be reset)."""

    def __init__(self, every: float = 0.02):
        self.every, self.high, self._stop = every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.high = max(self.high, rss())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.high = max(self.high, rss())


def _dequantize(packed, scales, group: int, dtype) -> torch.Tensor:
    """(out, in/2) uint8 nibbles + (out, in/group) scales -> (out, in) weight."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    q = torch.stack((low, high), dim=-1).view(packed.shape[0], -1)  # (out, in)
    q = q.view(q.shape[0], -1, group).to(dtype)
    return (q * scales.to(dtype)[..., None]).view(packed.shape[0], -1)


class _Int4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized on the fly in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x, packed, scales, bias, group):
        ctx.save_for_backward(packed, scales)
        ctx.group = group
        return F.linear(x, _dequantize(packed, scales, group, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        packed, scales = ctx.saved_tensors
        w = _dequantize(packed, scales, ctx.group, grad.dtype)
        return grad @ w, None, None, None, None


class Int4Linear(nn.Module):
    """Weight-only int4 linear with random weights made directly in packed form."""

    def __init__(self, in_features: int, out_features: int, group: int, dtype):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("packed", torch.randint(0, 256, (out_features, in_features // 2),
                                                     dtype=torch.uint8))
        # Uniform int4 in [-8, 7] has std ~4.6: scale 0.0043 gives weights of std ~0.02.
        self.register_buffer("scales", torch.full((out_features, in_features // group), 0.0043,
                                                  dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype))

    def forward(self, x):
        return _Int4Matmul.apply(x, self.packed, self.scales, self.bias.to(x.dtype), self.group)


SCALE = 0.0043  # uniform nibbles (std ~4.6 steps) -> weights of std ~0.02, like the real model


def int4_linear(in_features: int, out_features: int, group: int, dtype) -> tuple[nn.Module, str]:
    """A random int4 linear made directly in packed form: localglm's, else the one above."""
    try:
        from localglm.quantize import QuantizedLinear
    except ImportError:
        return Int4Linear(in_features, out_features, group, dtype), "benchmark Int4Linear"
    m = QuantizedLinear(in_features, out_features, bits=4, group_size=group, dtype=dtype)
    m.weight.random_(0, 256)  # two random nibbles per byte
    m.weight_scale.fill_(SCALE)
    m.weight_zero.fill_(SCALE / 2)  # (q - 8) * scale + zero is then centred on 0
    return m, "localglm.quantize.QuantizedLinear"


def int4_block(cfg: ModelConfig, i: int, dtype) -> tuple[GLMBlock, str]:
    """One block: real layer norms, int4 linears; its float linears only ever exist on meta."""
    with torch.device("meta"):
        block = GLMBlock(cfg, i)
    for name in ("input_layernorm", "post_attention_layernorm"):
        setattr(block, name, nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon,
                                          dtype=dtype))
    for name in LINEARS:
        lin = block.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        q, how = int4_linear(lin.in_features, lin.out_features, cfg.quantization_group_size,
                             dtype)
        setattr(block.get_submodule(parent), leaf, q)
    return block, how


def build_model(cfg: ModelConfig, dtype) -> tuple[ChatGLMModel, str]:
    """Full-size int4 model, block by block; float weights only for embeddings and norms."""
    with torch.device("meta"):
        model = ChatGLMModel(cfg)
    emb = torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype).normal_(0, 0.02)
    model.transformer.word_embeddings = nn.Embedding.from_pretrained(emb, freeze=True)
    how = ""
    for i in range(cfg.num_layers):
        model.transformer.layers[i], how = int4_block(cfg, i, dtype)
    model.transformer.final_layernorm = nn.LayerNorm(cfg.hidden_size, dtype=dtype)
    model.rotary = RotaryTable(cfg.head_dim // 2, cfg.max_sequence_length)
    model.requires_grad_(False)
    return model, how


def example(seq_len: int, cfg: ModelConfig, seed: int = 0) -> Encoded:
    """A random prompt (half the tokens) + [gMASK] <sop> + answer + <eop>, seq_len in all."""
    g = torch.Generator().manual_seed(seed)
    n_prompt = seq_len // 2 - 2
    n_answer = seq_len - n_prompt - 3
    words = torch.randint(5, 100000, (n_prompt + n_answer,), generator=g).tolist()
    ids = words[:n_prompt] + [cfg.gmask_token_id, cfg.bos_token_id] + words[n_prompt:] + \
        [cfg.eos_token_id]
    return Encoded(ids, n_prompt + 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=28, help="fewer for a quick trial")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default="float32")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.compute_dtype)
    # The defaults are ChatGLM-6B's shapes.
    cfg = ModelConfig(num_layers=args.layers, quantization_group_size=args.group_size)
    print(f"start: RSS {rss():.2f} GiB; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    model, how = build_model(cfg, dtype)
    print(f"built {cfg.num_layers}-layer int4 model ({how}) in {time.perf_counter() - t0:.0f} s:"
          f" RSS {rss():.2f} GiB, peak so far {peak_rss():.2f} GiB")
    lora.apply_lora(model, r=args.lora_r, alpha=2 * args.lora_r)
    params = lora.lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_train = sum(p.numel() for p in params)
    print(f"LoRA r={args.lora_r}: {n_train / 1e6:.1f}M trainable parameters; "
          f"RSS {rss():.2f} GiB")
    tb = collate([example(args.seq_len, cfg)], cfg, "cpu")
    model.train()
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        with RSSSampler() as sampler:
            loss = loss_sum(model, tb, dtype, not args.no_gradient_checkpointing) / tb.n_tokens
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        print(f"step {step}: loss {float(loss.detach()):.3f}, {time.perf_counter() - t:.0f} s, "
              f"peak RSS during the step {sampler.high:.2f} GiB, after {rss():.2f} GiB")
    print(f"peak RSS of the whole run (ru_maxrss): {peak_rss():.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
