"""The built-in demo model: its files, loading it by name, the CLI, and what it answers."""

import json
import re
from pathlib import Path

import pytest

import localglm
from localglm import cli, demo
from localglm.demo.train import corpus

# Questions that are NOT in the training corpus (paraphrases, both languages), and what the
# greedy answer must name. The demo is a 2 M-parameter model that learned its words from the
# corpus alone, so a question built on words it never saw ("transcript", "SDK") can still go to a
# neighbouring topic. The committed model gets 11 of these (float32) and 12 (bfloat16) right.
HELD_OUT = [
    ("Where can I download the ChatGLM weights from?", "localglm pull"),
    ("模型文件要去哪里下？", "localglm pull"),
    ("Can I put the model behind an HTTP endpoint for my app?", "localglm serve"),
    ("怎么把模型部署成一个接口服务？", "localglm serve"),
    ("I want to train it on my company's Q&A pairs, how?", "localglm finetune"),
    ("怎样用自己的问答数据训练模型？", "localglm finetune"),
    ("My laptop only has 8 GB of RAM, which version should I use?", "int4"),
    ("从 Hugging Face 下载太慢了，国内有什么办法？", "HF_ENDPOINT=https://hf-mirror.com"),
    ("How can I keep a transcript of my conversation?", "/save"),
    ("怎么看我的电脑够不够跑这个模型？", "localglm doctor"),
    ("Is there a way to chat from the command line?", "localglm chat"),
    ("有网页版的聊天界面吗？", "/chat/"),
    ("How do I use my LoRA after training?", "--adapter"),
    ("用 OpenAI 的 SDK 怎么连？", "/v1"),
    ("How do I quantize ChatGLM-6B to 4 bits as it loads?", "--precision int4"),
]
MUST_GET = 11
GREEDY = {"temperature": 0, "max_new_tokens": 160}
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def model():
    return localglm.load("demo", precision="float32", device="cpu")


def test_held_out_questions_are_not_in_the_corpus():
    text = corpus.CORPUS.read_text(encoding="utf-8")
    for question, _ in HELD_OUT:
        assert question not in text
        assert question not in corpus.questions(corpus.load_intents())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_held_out_questions_get_the_right_command(precision):
    model = localglm.load("demo", precision=precision, device="cpu")
    missed = []
    for question, command in HELD_OUT:
        answer, _ = model.chat(question, [], **GREEDY)
        if command not in answer:
            missed.append(f"{question} -> {answer}")
        # Whatever the topic, the answer is in the language of the question.
        assert bool(CJK.search(answer)) == bool(CJK.search(question)), answer
    assert len(HELD_OUT) - len(missed) >= MUST_GET, "\n".join(missed)


def test_greeting_and_the_readme_question(model):
    hello, history = model.chat("你好", [], **GREEDY)
    assert hello.startswith("你好") and "localglm" in hello
    assert "localglm pull THUDM/chatglm-6b-int4" in hello
    int4, _ = model.chat("How do I run the int4 model?", [], **GREEDY)
    assert "localglm pull THUDM/chatglm-6b-int4" in int4
    assert "localglm chat THUDM/chatglm-6b-int4" in int4
    # A second round in the official multi-round prompt answers the new question.
    again, _ = model.chat("How do I run the int4 model?", history, **GREEDY)
    assert again == int4


def test_model_directory_is_in_the_official_layout():
    d = demo.MODEL_DIR
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json", "ice_text.model", "model.safetensors", "tokenizer_config.json",
        "training.json"]
    config = json.loads((d / "config.json").read_text())
    official = json.loads((Path(__file__).parent / "data/chatglm-6b-tiny/config.json").read_text())
    assert set(official) - {"auto_map", "transformers_version"} <= set(config)
    assert config["model_type"] == "chatglm" and config["position_encoding_2d"] is True
    assert 128 <= config["hidden_size"] <= 256 and config["num_layers"] <= 6
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "ChatGLMTokenizer"
    assert tok_config["num_image_tokens"] == 0
    assert (d / "model.safetensors").stat().st_size < 8 * 2**20


def test_tokenizer_ids_follow_the_official_layout(model):
    tok = model.tokenizer
    sp = tok._sp
    assert [sp.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<pad>", "<n>"]
    m = tok.mask_id
    assert (tok.gmask_id, tok.bos_id, tok.eos_id) == (m + 1, m + 4, m + 5)
    assert sp.id_to_piece(m + 8) == "<|tab|>" and sp.id_to_piece(m + 88) == "<0x00>"
    assert tok.vocab_size == m + 344  # as in THUDM/chatglm-6b: 130000 + 344
    cfg = model.config
    assert (cfg.mask_token_id, cfg.gmask_token_id, cfg.bos_token_id, cfg.eos_token_id,
            cfg.pad_token_id) == (m, m + 1, m + 4, m + 5, tok.pad_id)
    assert cfg.vocab_size == tok.vocab_size
    ids = tok.encode("[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：Hi\n答：")
    assert ids[-2:] == [tok.gmask_id, tok.bos_id] and tok.unk_id not in ids


def test_weights_use_the_official_names():
    from safetensors import safe_open

    with safe_open(str(demo.MODEL_DIR / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("transformer.word_embeddings.weight").dtype.is_floating_point
    assert "transformer.layers.0.attention.query_key_value.weight" in names
    assert "transformer.final_layernorm.bias" in names


def test_wheel_includes_the_demo_files():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["localglm.demo"]
    pkg = root / "localglm" / "demo"
    covered = {p for g in globs for p in pkg.glob(g)}
    data = [p for p in pkg.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert data and set(data) <= covered


def test_load_demo_by_name_and_describe(model):
    assert Path(model.path) == demo.MODEL_DIR
    assert demo.is_demo("demo") and not demo.is_demo("./demo") and not demo.is_demo(None)


def test_chat_without_a_model_runs_the_demo(capsys):
    rc = cli.main(["chat", "-p", "How do I run the int4 model?", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert demo.NOTICE in err and "localglm pull THUDM/chatglm-6b-int4" in err
    assert "localglm pull THUDM/chatglm-6b-int4" in out


def test_chat_help_shows_model_as_optional(capsys):
    with pytest.raises(SystemExit):
        cli.main(["chat", "--help"])
    out = capsys.readouterr().out
    assert "[MODEL]" in out and "(default: demo)" in out


def test_serve_demo(monkeypatch, capsys):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    answered = []

    def run(app, **kwargs):  # instead of serving forever: one request while the worker runs
        answered.append(TestClient(app).post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "How do I start a server?"}],
            "temperature": 0}))

    monkeypatch.setattr(uvicorn, "run", run)
    assert cli.main(["serve", "demo", "--precision", "float32", "--no-webui"]) == 0
    assert demo.NOTICE in capsys.readouterr().err
    (r,) = answered
    assert r.status_code == 200
    assert "localglm serve" in r.json()["choices"][0]["message"]["content"]
