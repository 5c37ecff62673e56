"""`localglm rm`: delete a model from the Hugging Face cache."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Delete a model (every revision of it) from the Hugging Face cache and show the space freed.
Asks first unless -y is given. Only the cache is touched; a model directory of your own is
never deleted.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("model", metavar="MODEL_ID", help="repo id, as `localglm list` shows it")
    p.add_argument("-y", "--yes", action="store_true", help="delete without asking")


def main(args: argparse.Namespace) -> int:
    from ..devices import fmt_bytes
    from ..hub import hub_cache_dir
    from ..inventory import plan_delete

    cache = hub_cache_dir()
    plan = plan_delete(args.model, cache)
    print(f"{plan.repo_id}: {plan.what}, {fmt_bytes(plan.size)} in {cache}")
    if not args.yes:
        try:
            answer = input("delete it? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted (-y deletes without asking)", file=sys.stderr)
            return 1
    plan.execute()
    print(f"deleted {plan.repo_id}, freed {fmt_bytes(plan.size)}")
    return 0
