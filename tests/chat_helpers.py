"""A tiny chat model for the conversation, `qkv chat` and chat-training tests: byte-level BPE trained
offline, ChatML special tokens, a ChatML template, a random CausalLM."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["hello there, how are you today?", "i am fine, thank you very much", "what is the colour of the sky",
          "the sky is blue and the grass is green", "tell me a story about a cat and a dog"] * 20


def tiny_tokenizer(template: str | None = CHATML):
    from tokenizers import Tokenizer as Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from qkv.models.chat import ChatTemplate
    from qkv.pretrained import Tokenizer

    tok = Tok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    specials = {"pad_token": "<pad>", "eos_token": "<|im_end|>"}
    chat = ChatTemplate(template, special_tokens=specials) if template else None
    return Tokenizer(tok, pad_token="<pad>", eos_token="<|im_end|>", chat_template=chat)


def tiny_model(template: str | None = CHATML, seed: int = 0, **config):
    from qkv.models import CausalLM, CausalLMConfig

    tok = tiny_tokenizer(template)
    torch.manual_seed(seed)
    cfg = {"vocab_size": tok.vocab_size, "dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_positions": 256,
           "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    model = CausalLM(CausalLMConfig(**{**cfg, **config})).init_weights(std=0.2).eval()
    model.tokenizer = tok
    return model


def tiny_folder(path: Path, template: str | None = CHATML, **config) -> Path:
    """The tiny model saved as a folder `qkv.load` reads (config.json, model.safetensors, tokenizer files)."""
    from qkv.train.checkpoint import save_pretrained

    save_pretrained(tiny_model(template, **config), path)
    return path
