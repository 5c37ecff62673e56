"""ChatGLMTokenizer and StreamDecoder against the official tokenizer's golden outputs."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from localglm.errors import ModelFormatError
from localglm.tokenizer import ChatGLMTokenizer, StreamDecoder

MODEL_DIR = Path(__file__).parent / "data" / "chatglm-6b-tiny"
GOLDEN_DIR = MODEL_DIR / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "tokenizer.json").read_text(encoding="utf-8"))
CASES = json.loads((GOLDEN_DIR / "cases.json").read_text(encoding="utf-8"))
CHAT = json.loads((GOLDEN_DIR / "chat.json").read_text(encoding="utf-8"))
LAYOUT = GOLDEN["layout"]


def _case_id(case) -> str:
    return ascii(case["text"])[1:-1][:40] or "empty"


def _greedy_runs() -> list[tuple[str, list[int], str]]:
    """(name, generated ids, official decode) of every greedy run in cases.json/chat.json."""
    runs = [(c["name"], c["greedy_new_ids"], c["greedy_text"]) for c in CASES["cases"]]
    for variant, group in CASES["variants"].items():
        runs += [(f"{variant}/{c['name']}", c["greedy_new_ids"], c["greedy_text"])
                 for c in group["cases"]]
    runs += [(f"chat{r['round']}", r["generated_ids"], r["raw_decoded"]) for r in CHAT["rounds"]]
    return runs


GREEDY = _greedy_runs()


@pytest.fixture(scope="module")
def tok() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_dir(MODEL_DIR)


# -- golden tokenizer cases ---------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDEN["cases"], ids=_case_id)
def test_encode(tok, case):
    assert tok.encode(case["text"]) == case["encode"]
    assert tok.encode(case["text"]) == case["call_input_ids"]
    assert tok.encode(case["text"], add_special_tokens=False) == case["encode_no_special"]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=_case_id)
def test_tokenize(tok, case):
    assert tok.tokenize(case["text"]) == case["tokenize"]


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=_case_id)
def test_decode(tok, case):
    assert tok.decode(case["encode"]) == case["decode_encode"]
    assert tok.decode(case["encode_no_special"]) == case["decode_no_special"]
    assert (tok.decode(case["encode"]) == case["text"]) == case["roundtrip_exact"]


@pytest.mark.parametrize("case", GOLDEN["decode_cases"], ids=lambda c: str(c["ids"])[:40])
def test_decode_cases(tok, case):
    assert tok.decode(case["ids"]) == case["decode"]


@pytest.mark.parametrize("name,ids,text", GREEDY, ids=[r[0] for r in GREEDY])
def test_decode_generated(tok, name, ids, text):
    assert tok.decode(ids) == text


def test_special_ids_and_vocab_size(tok):
    special = LAYOUT["special_ids"]
    assert tok.vocab_size == LAYOUT["vocab_size"]
    assert (tok.bos_id, tok.eos_id) == (special["<sop>"], special["<eop>"])
    assert (tok.mask_id, tok.gmask_id) == (special["[MASK]"], special["[gMASK]"])
    assert (tok.pad_id, tok.unk_id) == (special["<pad>"], special["<unk>"])


def test_encode_prompts_of_cases_and_chat(tok):
    # chat.json stores the exact prompt string; cases.json prompts are checked via decode.
    for r in CHAT["rounds"]:
        assert tok.encode(r["prompt"]) == r["input_ids"]


def test_batch_encode(tok):
    batch = CASES["batch"]
    padded, pads = tok.batch_encode(batch["texts"])
    assert padded == batch["input_ids"]
    assert pads == [row.count(tok.pad_id) for row in batch["input_ids"]]
    assert pads[0] > 0 and pads[1] == 0
    assert tok.batch_encode([]) == ([], [])


def test_out_of_range_id_is_an_error(tok):
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        StreamDecoder(tok).add(-1)


# -- StreamDecoder ------------------------------------------------------------------------

def _stream(tok, ids) -> list[str]:
    """Chunks a StreamDecoder returns for ``ids``, checking they never need to be taken back."""
    final = tok.decode(ids)
    decoder, chunks = StreamDecoder(tok), []
    for i in ids:
        chunks.append(decoder.add(i))
        assert final.startswith("".join(chunks)), (ids, chunks)
        assert decoder.text == "".join(chunks)
    chunks.append(decoder.flush())
    assert "".join(chunks) == final, (ids, chunks)
    assert decoder.text == final
    return chunks


def _golden_id_lists() -> list[list[int]]:
    lists = [c[k] for c in GOLDEN["cases"] for k in ("encode", "encode_no_special")]
    lists += [c["ids"] for c in GOLDEN["decode_cases"]]
    lists += [ids for _, ids, _ in GREEDY]
    lists += [c["input_ids"] for c in CASES["cases"]] + CASES["batch"]["input_ids"]
    return lists


def test_stream_matches_decode_on_golden_ids(tok):
    for ids in _golden_id_lists():
        _stream(tok, ids)


def test_stream_holds_back_incomplete_utf8(tok):
    emoji = [2328, 2247, 2240, 2216]  # <0xF0> <0x9F> <0x98> <0x80> = U+1F600
    assert tok.decode(emoji) == "😀"
    assert _stream(tok, emoji) == ["", "", "", "😀", ""]
    assert _stream(tok, emoji[:2]) == ["", "", "��"]  # only flush shows the broken bytes


def test_stream_holds_back_space_before_punctuation(tok):
    ids = tok.encode("Hello , world !", add_special_tokens=False)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == "Hello, world!"
    assert not any(c.endswith(" ") for c in chunks)


def test_stream_holds_back_partial_blank_marker(tok):
    # "<|blank_3|>" typed as ordinary pieces still decodes to three spaces.
    ids = tok.encode("a<|blank_3", add_special_tokens=False)
    ids += tok.encode("x|>b", add_special_tokens=False)[2:]  # drop the "▁", "x" in front
    assert tok.decode(ids) == "a   b"
    _stream(tok, ids)


def _tricky_ids(tok) -> list[list[int]]:
    """Id pools that exercise every held-back case: bytes, spaces, markers, clean-up."""
    texts = ["a . b , c ! d ? e ' f n't 'm 's 've 're x", "<|blank_3 |> <n <|tab| < | _ >",
             "Isn 't it ? I 'm", "  \t\n x", "<|blank_80|>"]
    plain = sorted({i for t in texts for i in tok.encode(t, add_special_tokens=False)})
    first = LAYOUT["piece_types"]["byte_first"]
    leads = [first + b for b in (0xC3, 0xE4, 0xE9, 0xF0)]
    conts = [first + b for b in (0x80, 0x96, 0x9F, 0xA9, 0xB8, 0xBF)]
    other = LAYOUT["piece_types"]["control"] + LAYOUT["piece_types"]["unknown"] + [5, 5, 5]
    return [plain, leads + conts + conts, other, LAYOUT["piece_types"]["user_defined"]]


def test_stream_matches_decode_on_random_ids(tok):
    pools, rng = _tricky_ids(tok), random.Random(1016)
    weights = [6, 3, 1, 1]
    for _ in range(400):
        n = rng.randint(1, 60)
        ids = [rng.choice(rng.choices(pools, weights)[0]) for _ in range(n)]
        _stream(tok, ids)


def test_stream_decodes_a_small_window(tok):
    text = GOLDEN["cases"][-1]["text"] + "\n" + "def f(x):\n    return x  # ok\n"
    ids = tok.encode(text * 20, add_special_tokens=False)
    decoder, out, longest = StreamDecoder(tok), [], 0
    for i in ids:
        out.append(decoder.add(i))
        longest = max(longest, len(decoder._window))
    out.append(decoder.flush())
    assert "".join(out) == tok.decode(ids)
    assert len(ids) > 2000 and longest <= 16


# -- from_dir -----------------------------------------------------------------------------

def _copy_model(tmp_path: Path, skip: str | None = None) -> Path:
    for name in ("ice_text.model", "tokenizer_config.json"):
        if name != skip:
            shutil.copy(MODEL_DIR / name, tmp_path / name)
    return tmp_path


def test_from_dir_missing_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        ChatGLMTokenizer.from_dir(tmp_path / "nope")


@pytest.mark.parametrize("name", ["ice_text.model", "tokenizer_config.json"])
def test_from_dir_missing_file(tmp_path, name):
    _copy_model(tmp_path, skip=name)
    with pytest.raises(ModelFormatError, match=name.replace(".", r"\.")):
        ChatGLMTokenizer.from_dir(tmp_path)


def test_from_dir_git_lfs_pointer(tmp_path):
    _copy_model(tmp_path)
    (tmp_path / "ice_text.model").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:5e974d9a69c242ce014c88c2b26089270f6198f3c0b700a887666cd3e816f17e\n"
        "size 2706249\n")
    with pytest.raises(ModelFormatError, match="git lfs pull") as err:
        ChatGLMTokenizer.from_dir(tmp_path)
    assert "ice_text.model" in str(err.value)


def test_from_dir_corrupt_model(tmp_path):
    _copy_model(tmp_path)
    (tmp_path / "ice_text.model").write_bytes(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(ModelFormatError, match="ice_text.model"):
        ChatGLMTokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("config", ["{not json", '{"num_image_tokens": -1}', "[]"])
def test_from_dir_bad_config(tmp_path, config):
    _copy_model(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(ModelFormatError, match="tokenizer_config.json"):
        ChatGLMTokenizer.from_dir(tmp_path)


def test_num_image_tokens_shifts_every_id(tmp_path, tok):
    _copy_model(tmp_path)
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    config["num_image_tokens"] = 7
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shifted = ChatGLMTokenizer.from_dir(tmp_path)
    assert shifted.vocab_size == tok.vocab_size + 7
    assert shifted.bos_id == tok.bos_id + 7 and shifted.pad_id == tok.pad_id + 7
    for case in GOLDEN["cases"]:
        ids = shifted.encode(case["text"])
        assert ids == [i + 7 for i in case["encode"]]
        assert shifted.decode(ids) == case["decode_encode"]
        assert "".join(_stream(shifted, ids)) == case["decode_encode"]
