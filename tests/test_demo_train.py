"""The demo model's training: corpus expansion, tokenizer, and the training script end to end."""

import random

import pytest

import localglm
from localglm import demo
from localglm.chat import build_prompt
from localglm.demo.train import corpus


@pytest.fixture(scope="module")
def intents():
    return corpus.load_intents()


def test_corpus_has_both_languages_and_several_phrasings(intents):
    names = {it.name for it in intents}
    assert {"download", "china", "precision", "int4", "chat", "save", "serve", "finetune",
            "greeting", "off_topic"} <= names
    for it in intents:
        for lang in corpus.LANGS:
            assert len(it.questions[lang]) >= 6, (it.name, lang)
            assert it.answers[lang]
    china = next(it for it in intents if it.name == "china")
    for lang in corpus.LANGS:
        assert "HF_ENDPOINT=https://hf-mirror.com" in china.answers[lang]
        assert "--source modelscope" in china.answers[lang]


def test_examples_are_seeded_and_include_multi_round_prompts(intents):
    a = corpus.examples(intents, seed=1)
    assert a == corpus.examples(intents, seed=1)
    assert a != corpus.examples(intents, seed=2)
    answers = {it.answers[lang] for it in intents for lang in corpus.LANGS}
    assert all(e.answer in answers for e in a)
    multi = [e for e in a if e.history]
    assert multi and len(multi) < len(a)
    prompt = build_prompt(multi[0].query, list(multi[0].history))
    assert prompt.startswith("[Round 0]\n问：") and prompt.endswith(f"\n问：{multi[0].query}\n答：")


def test_topics_are_put_into_every_frame_of_their_language(intents):
    frames = corpus.load_frames()
    assert all("{}" in f for lang in corpus.LANGS for f in frames[lang])
    asked = corpus.questions(intents, frames)
    finetune = next(it for it in intents if it.name == "finetune")
    assert "How can I fine-tune the model?" in asked and "怎么微调模型？" in asked
    picked = corpus.framed([finetune], frames, random.Random(0), per_topic=2)
    assert len(picked) == 2 * sum(len(finetune.topics[lang]) for lang in corpus.LANGS)
    assert {e.answer for e in picked} == set(finetune.answers.values())


def test_rewording_keeps_the_question():
    rng = random.Random(0)
    seen = {corpus.reword("How do I save a chat?", "en", rng) for _ in range(40)}
    assert "How do I save a chat" in seen and "how do i save a chat?" in seen
    assert any(s.endswith("how do I save a chat?") and s[0].isupper() for s in seen)


def test_tokenizer_training_reproduces_the_committed_model(intents):
    pytest.importorskip("google.protobuf", reason="reordering the pieces needs protobuf")
    from localglm.demo.train import spm, train

    model = spm.train(corpus.texts(intents) + train._prompt_texts(),
                      train.DemoConfig.vocab_size)
    assert model == (demo.MODEL_DIR / "ice_text.model").read_bytes()


def test_training_script_writes_a_loadable_model_and_is_deterministic(tmp_path, intents):
    pytest.importorskip("google.protobuf", reason="reordering the pieces needs protobuf")
    from localglm.demo.train import train

    cfg = train.DemoConfig(hidden_size=32, num_layers=1, num_attention_heads=2,
                           max_sequence_length=512, epochs=1, batch_tokens=2048, noise=0.5)
    out, again = tmp_path / "model", tmp_path / "again"
    logs = []
    meta = train.build(cfg, out, max_steps=2, log=logs.append)
    train.build(cfg, again, max_steps=2, log=logs.append)
    assert meta["parameters"] > 0 and len(meta["epoch_losses"]) == 1
    assert any("epoch 1/1: step 2" in line for line in logs)
    for name in ("model.safetensors", "ice_text.model", "config.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    llm = localglm.load(out, precision="float32", device="cpu")
    assert llm.config.hidden_size == 32
    answer, history = llm.chat("你好", [], temperature=0, max_new_tokens=4)
    assert history == [("你好", answer)]


def test_noise_changes_only_the_question():
    from localglm.demo.train.train import add_noise
    from localglm.finetune.data import Encoded

    question, tail = list(range(10, 20)), [1001, 1004, 50, 51, 52, 1005]  # [gMASK] <sop> ...
    for seed in range(20):
        noisy = add_noise(Encoded(question + tail, len(question) + 1), random.Random(seed),
                          range(5, 1000))
        assert noisy.ids[noisy.context - 1:] == tail  # [gMASK] <sop> answer <eop> intact
        assert noisy.ids[:noisy.context - 1] != question
        assert abs(noisy.context - 1 - len(question)) <= 2
