"""`localglm pull`: download a model into the Hugging Face cache, checked file by file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Download a ChatGLM-6B model (THUDM/chatglm-6b, THUDM/chatglm-6b-int8, THUDM/chatglm-6b-int4 or
any repo in the same layout) into the Hugging Face cache, where `localglm chat MODEL_ID` finds
it. Only the checkpoint files are fetched (config.json, weight shards and their index,
tokenizer files, README/LICENSE); a repo's own Python code is never downloaded. Every file is
checked against the checksum the hub publishes for it (sha256 for the LFS-stored weights and
tokenizer); a file that does not match is removed and fetched again. A dropped connection
resumes where it stopped; after Ctrl-C, run the same command again: files already complete
are kept. Nothing is ever downloaded by other commands.
"""

EPILOG = """\
examples:
  localglm pull THUDM/chatglm-6b-int4
  # through https://hf-mirror.com, the mirror commonly used in mainland China:
  HF_ENDPOINT=https://hf-mirror.com localglm pull THUDM/chatglm-6b-int4
  localglm pull THUDM/chatglm-6b --revision COMMIT    # pin an exact version
  localglm pull MODELSCOPE_ID --source modelscope --local-dir ./chatglm-6b

The cache is HF_HUB_CACHE (default: $HF_HOME/hub, i.e. ~/.cache/huggingface/hub); a gated or
private model needs HF_TOKEN (or `hf auth login`).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("model", metavar="MODEL_ID", help="repo id, e.g. THUDM/chatglm-6b-int4")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit to download (default: main; ModelScope: its "
                   "default)")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="Hugging Face Hub or mirror to download from (default: HF_ENDPOINT, "
                   "else https://huggingface.co; in China e.g. https://hf-mirror.com)")
    p.add_argument("--source", choices=["huggingface", "modelscope"], default="huggingface",
                   help="where to download from (modelscope needs "
                   "`pip install \"localglm[modelscope]\"`; default: huggingface)")
    p.add_argument("--local-dir", type=Path, default=None, metavar="DIR",
                   help="download into this plain directory instead of the cache; chat with "
                   "`localglm chat DIR`")
    p.add_argument("--max-workers", type=int, default=8,
                   help="files downloaded at the same time (default: 8)")


def main(args: argparse.Namespace) -> int:
    from ..hub import HubError, pull, pull_modelscope
    from ..inventory import describe_dir

    if args.model.count("/") != 1 or args.model.startswith((".", "/", "~")):
        raise HubError(f"{args.model!r} is not a model id (ORG/NAME, e.g. THUDM/chatglm-6b)")
    show = sys.stderr.isatty()
    try:
        if args.source == "modelscope":
            if args.endpoint:
                raise HubError("--endpoint is for the Hugging Face Hub; ModelScope has its own "
                               "(MODELSCOPE_DOMAIN)")
            path = pull_modelscope(args.model, args.revision, args.local_dir)
        else:
            path = pull(args.model, revision=args.revision or "main", endpoint=args.endpoint,
                        local_dir=args.local_dir, max_workers=args.max_workers, progress=show)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue (complete files are "
              "kept)", file=sys.stderr)
        return 130
    entry = describe_dir(path)
    if entry.problems:
        raise HubError(f"{args.model} was downloaded to {path} but is not usable: {entry.status}")
    by_id = (args.source == "huggingface" and args.local_dir is None
             and args.revision in (None, "main"))
    target = args.model if by_id else str(path)
    print(f"done: {args.model} ({entry.precision}) is complete in {path}\n"
          f"chat with: localglm chat {target}")
    return 0
