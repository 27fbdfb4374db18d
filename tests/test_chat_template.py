"""A chat template ships with every tokenizer (the embedded model's and each one the recipe
trains): `apply_chat_template` and `pipeline(messages)` work (the server's use of it is tested with
the server)."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import story_text
from twotower.default import DEFAULT_MODEL_DIR, load_model
from twotower.tokenizer import CHAT_TEMPLATE, train_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "user", "content": "Tell a story"}]
TRANSCRIPT = "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Tell a story"


@pytest.fixture(scope="module")
def embedded():
    return load_model(None)


def test_the_embedded_and_trained_tokenizers_carry_the_template(tmp_path):
    (tmp_path / "text.txt").write_text(story_text(20_000))
    train_tokenizer([tmp_path / "text.txt"], tmp_path / "tok", vocab_size=300)
    for folder in (DEFAULT_MODEL_DIR, tmp_path / "tok"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template == CHAT_TEMPLATE, folder
        assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == TRANSCRIPT
        prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert prompt == TRANSCRIPT + "\nAssistant:"
        with pytest.raises(Exception, match="unknown chat role"):
            tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_pipeline_takes_messages(embedded):
    model, tokenizer = embedded
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe(MESSAGES, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert out[:-1] == MESSAGES and out[-1]["role"] == "assistant"
    ids = tokenizer(TRANSCRIPT + "\nAssistant:", return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate_ar(ids, max_new_tokens=6)[0, ids.shape[1]:], skip_special_tokens=True)
    assert out[-1]["content"] == expected
