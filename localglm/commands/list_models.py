"""`localglm list`: the models in the Hugging Face cache (and given directories)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
List the models in the Hugging Face cache (HF_HUB_CACHE, default $HF_HOME/hub) and any model
directories given, with the precision their config.json declares (fp16, bf16, int8, int4),
their size on disk and whether they are complete: no missing shards (from the weight index),
no missing tokenizer files, no Git LFS pointer files in place of the weights.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                   help="model directories to show as well")


def main(args: argparse.Namespace) -> int:
    from ..devices import fmt_bytes
    from ..hub import hub_cache_dir
    from ..inventory import cached_models, describe_dir

    cache = hub_cache_dir()
    entries = cached_models(cache) + [describe_dir(d) for d in args.dirs]
    print(f"Hugging Face cache: {cache}")
    if not entries:
        print("no models; download one with `localglm pull THUDM/chatglm-6b-int4`")
        return 0
    rows = [("MODEL", "REVISION", "PRECISION", "SIZE", "STATUS")]
    rows += [(e.name, e.revision, e.precision, fmt_bytes(e.size), e.status) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    return 0
