"""Whisper test helpers: speech synthesised offline with espeak-ng, and transformers on qkv's weights."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "The weather today is sunny with a light breeze from the west.",
    "Seven hundred and twenty three people attended the meeting on Tuesday.",
    "Self attention lets every word look at every other word in the sentence.",
]


def espeak(text: str, path: Path, voice: str = "en-us", speed: int = 150, pitch: int = 50) -> Path:
    """Synthesise ``text`` to a 22.05 kHz WAV with espeak-ng (skips the test if it is not installed)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("needs espeak-ng: apt-get install espeak-ng")
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text], check=True,
                   capture_output=True)
    return path


def hf_whisper(model):
    """A transformers WhisperForConditionalGeneration holding a qkv SpeechRecognizer's weights."""
    import transformers as T

    c = model.config
    hf_cfg = T.WhisperConfig(
        vocab_size=c.vocab_size, d_model=c.dim, encoder_layers=c.n_layers, decoder_layers=c.n_decoder_layers,
        encoder_attention_heads=c.n_heads, decoder_attention_heads=c.n_heads, encoder_ffn_dim=c.ffn_dim,
        decoder_ffn_dim=c.ffn_dim, num_mel_bins=c.n_mels, max_source_positions=c.audio_positions,
        max_target_positions=c.max_positions, decoder_start_token_id=c.decoder_start_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, bos_token_id=c.eos_token_id,
        suppress_tokens=c.suppress_tokens, begin_suppress_tokens=c.begin_suppress_tokens,
    )
    hf = T.WhisperForConditionalGeneration(hf_cfg).eval()
    sd = model.state_dict()
    d = c.dim
    out = {}
    for side, n in (("encoder", c.n_layers), ("decoder", c.n_decoder_layers)):
        for i in range(n):
            s, t = f"{side}.layers.{i}.", f"model.{side}.layers.{i}."
            w, b = sd[s + "attn.qkv.weight"], sd[s + "attn.qkv.bias"]
            for j, name in enumerate("qkv"):
                out[t + f"self_attn.{name}_proj.weight"] = w[j * d : (j + 1) * d]
                if name != "k":
                    out[t + f"self_attn.{name}_proj.bias"] = b[j * d : (j + 1) * d]
            out[t + "self_attn.out_proj.weight"], out[t + "self_attn.out_proj.bias"] = sd[s + "attn.o.weight"], sd[s + "attn.o.bias"]
            if side == "decoder":
                out[t + "encoder_attn.q_proj.weight"], out[t + "encoder_attn.q_proj.bias"] = sd[s + "cross.q.weight"], sd[s + "cross.q.bias"]
                kv_w, kv_b = sd[s + "cross.kv.weight"], sd[s + "cross.kv.bias"]
                out[t + "encoder_attn.k_proj.weight"] = kv_w[:d]
                out[t + "encoder_attn.v_proj.weight"], out[t + "encoder_attn.v_proj.bias"] = kv_w[d:], kv_b[d:]
                out[t + "encoder_attn.out_proj.weight"] = sd[s + "cross.o.weight"]
                out[t + "encoder_attn.out_proj.bias"] = sd[s + "cross.o.bias"]
                for x in ("weight", "bias"):
                    out[t + f"encoder_attn_layer_norm.{x}"] = sd[s + f"cross_norm.{x}"]
            for x in ("weight", "bias"):
                out[t + f"self_attn_layer_norm.{x}"] = sd[s + f"attn_norm.{x}"]
                out[t + f"fc1.{x}"], out[t + f"fc2.{x}"] = sd[s + f"ffn.up.{x}"], sd[s + f"ffn.down.{x}"]
                out[t + f"final_layer_norm.{x}"] = sd[s + f"ffn_norm.{x}"]
    for x in ("weight", "bias"):
        out[f"model.encoder.conv1.{x}"], out[f"model.encoder.conv2.{x}"] = sd[f"enc_side.conv1.{x}"], sd[f"enc_side.conv2.{x}"]
        out[f"model.encoder.layer_norm.{x}"], out[f"model.decoder.layer_norm.{x}"] = sd[f"encoder.norm.{x}"], sd[f"decoder.norm.{x}"]
    out["model.encoder.embed_positions.weight"] = sd["enc_side.pos"]
    out["model.decoder.embed_tokens.weight"] = sd["tokens.weight"]
    out["model.decoder.embed_positions.weight"] = sd["dec_side.pos.weight"]
    out["proj_out.weight"] = sd["tokens.weight"]
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert not unexpected and all("k_proj.bias" in m for m in missing), (missing, unexpected)
    return hf


def hf_transcribe_ids(hf, features, config, max_new_tokens=100):
    """transformers' greedy tokens after the prompt, with the checkpoint's suppressed tokens."""
    prompt = torch.tensor([config.decoder_prompt()] * features.shape[0])
    with torch.no_grad():
        out = hf.generate(input_features=features, decoder_input_ids=prompt, max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, suppress_tokens=config.suppress_tokens,
                          begin_suppress_tokens=config.begin_suppress_tokens, return_timestamps=False)
    seq = out.sequences if hasattr(out, "sequences") else out
    return seq
