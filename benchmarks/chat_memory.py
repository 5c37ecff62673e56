"""Chat for many rounds and print memory per round: it must stay flat once the budget is hit.

    python benchmarks/chat_memory.py tests/data/chatglm-6b-tiny --rounds 120 --max-context 128
    python benchmarks/chat_memory.py /path/to/int4-model --rounds 100 --max-context 1024
    python benchmarks/chat_memory.py --synthetic tests/data/chatglm-6b-tiny --rounds 100 \
        --max-context 48 --max-new-tokens 2   # full-size random int4 model, tiny tokenizer

Each round asks a new question with the whole conversation as history; older rounds are
dropped to fit the context budget, and the KV cache is reused, so memory is bounded.
"""

from __future__ import annotations

import argparse
import gc
import sys

import psutil
import torch


def run(model, rounds: int, max_new_tokens: int, out=sys.stdout) -> list[dict]:
    proc = psutil.Process()
    history: list = []
    rows = []
    print("round  prompt_tokens  dropped  answer_tokens  rss_mb  kv_cache_mb  cuda_max_mb",
          file=out)
    for i in range(rounds):
        *_, last = model.chat_stream(f"第{i}个问题：请继续讲下去。", history,
                                     max_new_tokens=max_new_tokens, do_sample=False)
        history = last.history
        gc.collect()
        row = {
            "round": i,
            "prompt_tokens": last.stats.prompt_tokens,
            "dropped": last.dropped,
            "answer_tokens": last.stats.generation_tokens,
            "rss_mb": proc.memory_info().rss / 2**20,
            "kv_cache_mb": model.cache().nbytes() / 2**20,
            "cuda_max_mb": (torch.cuda.max_memory_allocated() / 2**20
                            if torch.cuda.is_available() else 0.0),
        }
        rows.append(row)
        print("{round:5d}  {prompt_tokens:13d}  {dropped:7d}  {answer_tokens:13d}  "
              "{rss_mb:6.1f}  {kv_cache_mb:11.2f}  {cuda_max_mb:11.1f}".format(**row), file=out)
    tail = rows[-50:]
    growth = tail[-1]["rss_mb"] - tail[0]["rss_mb"]
    print(f"RSS growth over the last {len(tail)} rounds: {growth:+.1f} MB; KV cache "
          f"{rows[-1]['kv_cache_mb']:.2f} MB", file=out)
    return rows


def synthetic(tokenizer_dir: str, max_context: int | None):
    """A full-size ChatGLM-6B with random int4 weights, using the tokenizer in the given dir."""
    import dataclasses

    from localglm import bench
    from localglm.engine import LocalGLM
    from localglm.tokenizer import ChatGLMTokenizer

    tok = ChatGLMTokenizer.from_dir(tokenizer_dir)
    cfg = dataclasses.replace(bench.CHATGLM_6B, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                              mask_token_id=tok.mask_id, gmask_token_id=tok.gmask_id,
                              pad_token_id=tok.pad_id)
    model = bench.synthetic_model(cfg, "int4", torch.bfloat16)
    return LocalGLM(model, tok, torch.bfloat16, max_context=max_context, precision="int4",
                    path="synthetic chatglm-6b int4")


def main(argv=None) -> int:
    import localglm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model directory (with --synthetic: a tokenizer directory)")
    p.add_argument("--synthetic", action="store_true",
                   help="full-size ChatGLM-6B with random int4 weights instead of MODEL's")
    p.add_argument("--rounds", type=int, default=120)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.synthetic:
        model = synthetic(args.model, args.max_context)
    else:
        model = localglm.load(args.model, precision=args.precision, device=args.device,
                              max_context=args.max_context)
    run(model, args.rounds, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
