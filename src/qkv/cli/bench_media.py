"""`qkv bench media`: speech recognition and image classification against transformers, same weights, one process.

- Transcription: whisper-tiny.en (the offline CTranslate2 checkpoint, converted
  once) on clips synthesised with espeak-ng; qkv ``transcribe`` (features,
  KV-cached greedy decoding, detokenising) vs transformers'
  ``WhisperFeatureExtractor`` + ``generate`` with the same suppressed tokens.
- ViT-Base/16 (random weights) forward at batch 32, 224 x 224.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

import qkv

from .bench import interleaved, rate_table

CLIPS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "The weather today is sunny with a light breeze from the west.",
    "Seven hundred and twenty three people attended the meeting on Tuesday.",
    "Self attention lets every word look at every other word in the sentence.",
]


def whisper_to_transformers(model):
    """A transformers WhisperForConditionalGeneration holding a qkv SpeechRecognizer's weights."""
    import transformers as T

    c, sd, d = model.config, model.state_dict(), model.config.dim
    hf = T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=c.vocab_size, d_model=d, encoder_layers=c.n_layers, decoder_layers=c.n_decoder_layers,
        encoder_attention_heads=c.n_heads, decoder_attention_heads=c.n_heads, encoder_ffn_dim=c.ffn_dim,
        decoder_ffn_dim=c.ffn_dim, num_mel_bins=c.n_mels, max_source_positions=c.audio_positions,
        max_target_positions=c.max_positions, decoder_start_token_id=c.decoder_start_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, bos_token_id=c.eos_token_id,
        suppress_tokens=c.suppress_tokens, begin_suppress_tokens=c.begin_suppress_tokens)).eval()
    out = {}
    for side, n in (("encoder", c.n_layers), ("decoder", c.n_decoder_layers)):
        for i in range(n):
            s, t = f"{side}.layers.{i}.", f"model.{side}.layers.{i}."
            w, b = sd[s + "attn.qkv.weight"], sd[s + "attn.qkv.bias"]
            for j, name in enumerate("qkv"):
                out[t + f"self_attn.{name}_proj.weight"] = w[j * d : (j + 1) * d]
                if name != "k":  # Whisper's key projections have no bias
                    out[t + f"self_attn.{name}_proj.bias"] = b[j * d : (j + 1) * d]
            renames = {"self_attn.out_proj": "attn.o", "fc1": "ffn.up", "fc2": "ffn.down",
                       "self_attn_layer_norm": "attn_norm", "final_layer_norm": "ffn_norm"}
            if side == "decoder":
                kv_w, kv_b = sd[s + "cross.kv.weight"], sd[s + "cross.kv.bias"]
                out[t + "encoder_attn.k_proj.weight"] = kv_w[:d]
                out[t + "encoder_attn.v_proj.weight"], out[t + "encoder_attn.v_proj.bias"] = kv_w[d:], kv_b[d:]
                renames.update({"encoder_attn.q_proj": "cross.q", "encoder_attn.out_proj": "cross.o",
                                "encoder_attn_layer_norm": "cross_norm"})
            for theirs, ours in renames.items():
                for x in ("weight", "bias"):
                    out[t + f"{theirs}.{x}"] = sd[s + f"{ours}.{x}"]
    for x in ("weight", "bias"):
        for theirs, ours in (("encoder.conv1", "enc_side.conv1"), ("encoder.conv2", "enc_side.conv2"),
                             ("encoder.layer_norm", "encoder.norm"), ("decoder.layer_norm", "decoder.norm")):
            out[f"model.{theirs}.{x}"] = sd[f"{ours}.{x}"]
    out["model.encoder.embed_positions.weight"] = sd["enc_side.pos"]
    out["model.decoder.embed_tokens.weight"] = out["proj_out.weight"] = sd["tokens.weight"]
    out["model.decoder.embed_positions.weight"] = sd["dec_side.pos.weight"]
    missing, unexpected = hf.load_state_dict(out, strict=False)
    if unexpected or any("k_proj.bias" not in m for m in missing):
        raise RuntimeError(f"weight transfer incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf


def synthesize(texts: list[str], folder: Path) -> list[torch.Tensor]:
    """16 kHz waveforms of ``texts`` spoken by espeak-ng."""
    from qkv.models.audio import load_audio

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("the speech benchmark needs espeak-ng: apt-get install espeak-ng")
    waves = []
    for i, text in enumerate(texts):
        path = folder / f"clip{i}.wav"
        subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True)
        waves.append(load_audio(path))
    return waves


def bench_transcription(repeat: int = 3) -> dict:
    import transformers as T

    model = qkv.load("whisper-tiny.en")
    hf = whisper_to_transformers(model)
    fe = T.WhisperFeatureExtractor()
    with tempfile.TemporaryDirectory() as d:
        waves = synthesize(CLIPS, Path(d))
    prompt = torch.tensor([model.config.decoder_prompt()])
    c = model.config

    def ours():
        return [model.transcribe(w, sample_rate=16000) for w in waves]

    def theirs():
        out = []
        for w in waves:
            feats = torch.from_numpy(fe(w.numpy(), sampling_rate=16000, return_tensors="np")["input_features"])
            with torch.no_grad():
                ids = hf.generate(input_features=feats, decoder_input_ids=prompt, do_sample=False, max_new_tokens=440,
                                  suppress_tokens=c.suppress_tokens, begin_suppress_tokens=c.begin_suppress_tokens)
            out.append(model.tokenizer.decode(ids[0].tolist()).strip())
        return out

    same = ours() == theirs()
    tq, tr = interleaved(ours, theirs, repeat)
    return {"case": f"whisper-tiny.en: transcribe {len(waves)} espeak-ng clips", "baseline": "transformers generate",
            "qkv_s": tq, "baseline_s": tr, "speedup": tr / tq, "qkv_per_s": len(waves) / tq,
            "baseline_per_s": len(waves) / tr, "unit": "clips/s", "check": f"same text: {same}"}


def bench_vit(repeat: int = 3, batch: int = 32) -> dict:
    import transformers as T

    torch.manual_seed(0)
    hf = T.ViTModel(T.ViTConfig(), add_pooling_layer=False).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = qkv.load(d)
    x = torch.randn(batch, 3, 224, 224)

    def ours():
        with torch.no_grad():
            return model(x).last_hidden_state

    def theirs():
        with torch.no_grad():
            return hf(pixel_values=x).last_hidden_state

    err = float(((ours() - theirs()).abs().max() / theirs().abs().max()))
    tq, tr = interleaved(ours, theirs, repeat)
    return {"case": f"ViT-Base/16 forward, batch {batch}, 224 x 224", "baseline": "transformers ViTModel",
            "qkv_s": tq, "baseline_s": tr, "speedup": tr / tq, "qkv_per_s": batch / tq, "baseline_per_s": batch / tr,
            "unit": "images/s", "check": f"max rel. diff {err:.1e}"}


def run(repeat: int = 3, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda s: None)
    say("whisper-tiny.en transcription vs transformers")
    rows = [bench_transcription(repeat)]
    say("ViT-Base/16 forward vs transformers")
    rows.append(bench_vit(repeat))
    return {"speed": rows, "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "qkv": qkv.__version__}}


def format_table(result: dict, markdown: bool = False) -> str:
    return rate_table(result, markdown, digits=2)
