"""Train the demo's SentencePiece model and lay it out like THUDM/chatglm-6b's ice_text.model.

Same trainer settings as the official tokenizer (unigram, nmt_nfkc, byte fallback, the same
control and user-defined pieces) and the same id layout, so ``localglm.tokenizer`` handles it
exactly as it handles the real one:

    0 <unk>, 1 <s>, 2 </s>, 3 <pad>, 4 <n>, then the ordinary pieces, then
    [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>, <|tab|>,
    <|blank_2|> .. <|blank_80|>, and the 256 byte pieces <0x00> .. <0xFF>.

Reordering needs the ``protobuf`` package (``pip install protobuf``), only here.
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

from ...tokenizer import _MAX_BLANK, _preprocess

CONTROL = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
USER = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, _MAX_BLANK + 1)]
TOKENIZER_CONFIG = {
    "name_or_path": "localglm-demo",
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "gmask_token": "[gMASK]",
    "mask_token": "[MASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "num_image_tokens": 0,
}


def train(texts: list[str], vocab_size: int) -> bytes:
    """A unigram model trained on ``texts`` (after ChatGLM's whitespace preprocessing)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([_preprocess(t) for t in texts]),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may support fewer pieces
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        control_symbols=CONTROL,
        user_defined_symbols=USER,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1,  # deterministic
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return reorder(model.getvalue())


def reorder(model: bytes) -> bytes:
    """Move the pieces into the official id layout (module docstring)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    by_name = {p.piece: p for p in proto.pieces}
    normal_type = pb.ModelProto.SentencePiece.NORMAL
    first = ["<unk>", "<s>", "</s>", "<pad>", "<n>"]
    normal = [p for p in proto.pieces if p.type == normal_type]
    last = CONTROL + USER[1:] + [f"<0x{b:02X}>" for b in range(256)]
    order = [by_name[n] for n in first] + normal + [by_name[n] for n in last]
    if len(order) != len(proto.pieces):
        raise RuntimeError(f"reordering lost pieces: {len(order)} of {len(proto.pieces)}")
    copies = [type(p)() for p in order]
    for new, old in zip(copies, order, strict=True):
        new.CopyFrom(old)
    del proto.pieces[:]
    proto.pieces.extend(copies)
    return proto.SerializeToString()


def write(model: bytes, out_dir: Path) -> None:
    """ice_text.model + tokenizer_config.json, as in the official model directory."""
    import json

    (out_dir / "ice_text.model").write_bytes(model)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
