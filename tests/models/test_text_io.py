"""Text in, text out: a tokenizer trained offline travels with the checkpoint folder."""

import pytest
import torch
from hf_models import tiny_gpt_folder, transformers

import qkv


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_gpt_folder(tmp_path_factory.mktemp("tiny-gpt"))


def test_generate_text_equals_transformers_tokens(folder):
    model = qkv.load(folder)
    tok = model.tokenizer
    assert tok.pad_id == 0 and tok.eos_id == 2
    prompts = ["the river", "attention lets every token look"]
    texts = model.generate(prompts, max_new_tokens=6, eos_token_id=[])
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    for p, text in zip(prompts, texts):
        ids = torch.tensor([tok.encode(p)])
        ref = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert text == tok.decode(ref[0, ids.shape[1]:].tolist())
    assert isinstance(model.generate("the river", max_new_tokens=3), str)


def test_text_without_tokenizer_is_a_clear_error(folder):
    model = qkv.load(folder)
    model.tokenizer = None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model.generate("the river")
