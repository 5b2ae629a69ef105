"""Random-initialised Hugging Face models (no download) saved as folders, for parity tests."""

import atexit
import functools
import shutil
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="parity tests need transformers: pip install -e '.[test]'")

import qkv  # noqa: E402

T = transformers
_ROOT = Path(tempfile.mkdtemp(prefix="qkv-hf-"))
# The saved models are ~2 GB per process: remove them when the process exits (each xdist worker has its own).
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

# name -> (class, config kwargs). "tiny" configs exercise every option cheaply; "full" ones are real sizes.
CONFIGS = {
    "bert": (T.BertModel, T.BertConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=96, vocab_size=120)),
    "bert-seqcls": (T.BertForSequenceClassification, T.BertConfig, dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=120, num_labels=3)),
    "bert-tokcls": (T.BertForTokenClassification, T.BertConfig, dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=120, num_labels=5)),
    "bert-qa": (T.BertForQuestionAnswering, T.BertConfig, dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=120)),
    "gpt2": (T.GPT2LMHeadModel, T.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=128,
                                                    bos_token_id=1, eos_token_id=2)),
    "llama": (T.LlamaForCausalLM, T.LlamaConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=96, vocab_size=120,
                                                      bos_token_id=1, eos_token_id=2)),
    "llama-mqa-tied": (T.LlamaForCausalLM, T.LlamaConfig, dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
        vocab_size=120, tie_word_embeddings=True, rope_theta=500000.0, bos_token_id=1, eos_token_id=2)),
    "t5": (T.T5ForConditionalGeneration, T.T5Config, dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                                          vocab_size=120, decoder_start_token_id=0)),
    "t5-v1.1": (T.T5ForConditionalGeneration, T.T5Config, dict(
        d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4, vocab_size=120,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)),
    "bart": (T.BartForConditionalGeneration, T.BartConfig, dict(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=120, max_position_embeddings=128,
        forced_eos_token_id=None)),
    # full-size configurations (random weights)
    "bert-base": (T.BertModel, T.BertConfig, dict()),
    "gpt2-124m": (T.GPT2LMHeadModel, T.GPT2Config, dict()),
    "llama-small": (T.LlamaForCausalLM, T.LlamaConfig, dict(
        hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1376,
        vocab_size=32000, max_position_embeddings=2048)),
    "t5-small": (T.T5ForConditionalGeneration, T.T5Config, dict(decoder_start_token_id=0)),
    "bart-base": (T.BartForConditionalGeneration, T.BartConfig, dict(
        d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
        encoder_ffn_dim=3072, decoder_ffn_dim=3072, forced_eos_token_id=None)),
}
TINY = ["bert", "bert-seqcls", "bert-tokcls", "bert-qa", "gpt2", "llama", "llama-mqa-tied", "t5", "t5-v1.1", "bart"]
FULL = ["bert-base", "gpt2-124m", "llama-small", "t5-small", "bart-base"]
KIND = {"bert": "encoder", "gpt2": "causal", "llama": "causal", "t5": "seq2seq", "bart": "seq2seq"}


def kind(name: str) -> str:
    return KIND[name.split("-")[0]]


@functools.lru_cache(maxsize=None)
def pair(name: str):
    """(transformers model, qkv model loaded from its saved folder), both in eval mode, same weights."""
    cls, cfg_cls, kwargs = CONFIGS[name]
    torch.manual_seed(zlib.crc32(name.encode()))  # the same weights in every process (str hashes are salted)
    hf = cls(cfg_cls(**kwargs, attn_implementation="eager")).eval()
    folder = _ROOT / name
    hf.save_pretrained(folder)
    return hf, qkv.load(folder)


def vocab(name: str) -> int:
    return pair(name)[0].config.vocab_size


CORPUS = ["the river bank was muddy after the rain", "she walked to the bank to deposit money",
          "attention lets every token look at every other token", "the model reads the sentence twice"] * 20


def tiny_gpt_folder(path: Path) -> Path:
    """A random tiny GPT-2 with a byte-level BPE tokenizer trained offline on a toy corpus, saved in ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<eos>"]))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text('{"pad_token": "<pad>", "eos_token": "<eos>"}')
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=tok.get_vocab_size(), n_positions=64,
                       bos_token_id=2, eos_token_id=2, pad_token_id=0)
    T.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


# One tiny random model per family for config-field tests: (model class, config class, config kwargs).
FAMILIES = {
    "bert": (T.BertModel, T.BertConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=48, vocab_size=100, max_position_embeddings=64)),
    "gpt2": (T.GPT2LMHeadModel, T.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                                    bos_token_id=1, eos_token_id=2)),
    "llama": (T.LlamaForCausalLM, T.LlamaConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=48, vocab_size=100,
                                                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    "t5": (T.T5ForConditionalGeneration, T.T5Config, dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                                          vocab_size=100, decoder_start_token_id=0)),
    "bart": (T.BartForConditionalGeneration, T.BartConfig, dict(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=100, max_position_embeddings=64,
        forced_eos_token_id=None)),
    "vit": (T.ViTModel, T.ViTConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=48, image_size=16, patch_size=4)),
    "whisper": (T.WhisperForConditionalGeneration, T.WhisperConfig, dict(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=100, num_mel_bins=16, max_source_positions=20,
        max_target_positions=32, decoder_start_token_id=90, eos_token_id=91, pad_token_id=91, bos_token_id=91,
        suppress_tokens=[], begin_suppress_tokens=[91])),
}
# The Llama-like decoders (tests/models/test_decoder_families.py): tiny, GQA, windows shorter than the inputs.
_DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            vocab_size=100, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES.update({
    # (no sliding window here: dropping use_sliding_window alone would leave sliding layer_types without a window)
    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config, dict(_DEC)),
    "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config, dict(_DEC, head_dim=16)),
    "mistral": (T.MistralForCausalLM, T.MistralConfig, dict(_DEC, sliding_window=4)),
    "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config, dict(_DEC, head_dim=8, sliding_window=4,
                                                         query_pre_attn_scalar=16)),
    "gemma3_text": (T.Gemma3ForCausalLM, T.Gemma3TextConfig, dict(_DEC, head_dim=8, sliding_window=4,
                                                                  num_hidden_layers=3, sliding_window_pattern=3)),
    "phi3": (T.Phi3ForCausalLM, T.Phi3Config, dict(_DEC, sliding_window=5)),
    # vision: detection and segmentation
    "yolos": (T.YolosForObjectDetection, T.YolosConfig, dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=[32, 48],
        patch_size=8, num_detection_tokens=5)),
    "segformer": (T.SegformerForSemanticSegmentation, T.SegformerConfig, dict(
        # four stages, so that each per-stage list left out (its default has four values) still fits
        depths=[1, 1, 1, 1], sr_ratios=[4, 2, 1, 1], hidden_sizes=[16, 32, 40, 64], num_attention_heads=[1, 2, 5, 8],
        mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=32, num_labels=3)),
})


def save_family(folder: Path, family: str, seed: int = 0, **overrides):
    """A random tiny transformers model of ``family`` (config kwargs changed by ``overrides``), saved in
    ``folder``; returns it in eval mode."""
    cls, cfg_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    hf = cls(cfg_cls(**{**kwargs, **overrides}, attn_implementation="eager")).eval()
    hf.save_pretrained(folder)
    return hf


@torch.no_grad()
def family_outputs(family: str, hf, model):
    """(transformers output, qkv output) of one forward on the same random inputs: logits where the
    family has a head, else the last hidden state."""
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        size = hf.config.image_size
        x = torch.randn(2, hf.config.num_channels, *(size if isinstance(size, list) else [size, size]), generator=g)
        return hf(pixel_values=x).last_hidden_state, model(x).last_hidden_state
    if family == "yolos":
        x = torch.randn(2, hf.config.num_channels, *hf.config.image_size, generator=g)
        return hf(pixel_values=x).pred_boxes, model(x).pred_boxes
    if family == "segformer":
        x = torch.randn(2, hf.config.num_channels, 64, 80, generator=g)
        return hf(pixel_values=x).logits, model(x).logits
    vocab = hf.config.vocab_size
    dec = torch.randint(3, vocab, (2, 5), generator=g)
    if family == "whisper":
        feats = torch.randn(2, 16, 40, generator=g)
        return hf(input_features=feats, decoder_input_ids=dec).logits, model(feats, decoder_input_ids=dec).logits
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    if family == "bert":
        return hf(input_ids=ids).last_hidden_state, model(ids).last_hidden_state
    if family in ("t5", "bart"):
        return hf(input_ids=ids, decoder_input_ids=dec).logits, model(ids, decoder_input_ids=dec).logits
    return hf(input_ids=ids).logits, model(ids).logits
