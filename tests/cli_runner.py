"""Runs `localglm` as a user would, with the model's raw output optionally scripted or slowed.

Used by the terminal tests (through a pipe or a pseudo-terminal):
LOCALGLM_TEST_REPLY  JSON list of text pieces that every answer is made of, instead of the
                     model's own (the prompt still goes through the real chat code);
LOCALGLM_TEST_DELAY  seconds to wait before each piece, so that a test can interrupt an answer.
"""

import json
import os
import sys
import time


def scripted(pieces):
    from localglm.generate import GenerationResponse

    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        yield GenerationResponse(text=piece, token=None if last else 0,
                                 finish_reason="stop" if last else None)


def main() -> int:
    from localglm import cli, engine

    reply = os.environ.get("LOCALGLM_TEST_REPLY")
    delay = float(os.environ.get("LOCALGLM_TEST_DELAY", "0"))
    model_steps = engine.LocalGLM.stream_generate

    def stream_generate(self, ids, gen=None, **kwargs):
        steps = scripted(json.loads(reply)) if reply else model_steps(self, ids, gen, **kwargs)
        for step in steps:
            time.sleep(delay)
            yield step

    engine.LocalGLM.stream_generate = stream_generate
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
