"""localglm's web chat on a Hugging Face Space.

The Space runs ``python app.py``: it downloads the model named by $LOCALGLM_MODEL (default
THUDM/chatglm-6b-int4) with ``localglm pull``, runs it on the GPU if the Space has one (else
int4 on the CPU) and serves the web chat at / (redirected to /chat/) and the OpenAI API at /v1
on port 7860. Every visitor keeps their own conversation. Optional settings (Space variables
and secrets): LOCALGLM_PRECISION, LOCALGLM_API_KEY (then the key is the web chat's password),
HF_ENDPOINT (a mirror). LOCALGLM_MODEL=demo serves the small built-in model.
"""

import os
import sys

from localglm.server.hosted import load_model, serve


def main() -> None:
    llm = load_model()
    print(f"localglm: {llm.describe()}", file=sys.stderr, flush=True)
    # A Space routes its public address to port 7860 and says so in these variables.
    serve(llm, host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
          port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
          api_key=os.environ.get("LOCALGLM_API_KEY") or None)


if __name__ == "__main__":
    main()
