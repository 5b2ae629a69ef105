"""Every converter ends in one check (`KeyMap.result`) that names missing and unused keys together;
tied weights are shared, and a stored copy that differs is refused."""

import pytest
import torch
from hf_models import pair, save_family

from qkv.convert import ConversionError, KeyMap, find_prefix, huggingface
from qkv.convert.huggingface._layers import bart_layer


def test_renamed_key_names_both_the_missing_and_the_unused_key():
    hf, model = pair("gpt2")
    sd = dict(hf.state_dict())
    sd["transformer.h.1.mlp.c_fc_renamed.weight"] = sd.pop("transformer.h.1.mlp.c_fc.weight")
    with pytest.raises(ConversionError) as e:
        huggingface.gpt2(sd, model.config)
    message = str(e.value)
    assert "has no keys ['transformer.h.1.mlp.c_fc.weight']" in message
    assert "not used by the conversion: ['transformer.h.1.mlp.c_fc_renamed.weight']" in message


def test_scopes_share_the_accounting():
    sd = {"bert.a.weight": torch.ones(2), "classifier.weight": torch.ones(3), "bert.layer.0.w": torch.ones(1)}
    km = KeyMap(sd, find_prefix(sd, "a.weight", ("", "bert.")))
    km.copy("a", "a.weight")
    km.within("layer.0.", "layers.0.").copy("w", "w")
    km.scope("").copy("head", "classifier.weight")
    out = km.result()
    assert sorted(out) == ["a", "head", "layers.0.w"]


def test_tied_copies_must_match():
    sd = {"emb": torch.ones(4, 2), "head": torch.ones(4, 2)}
    km = KeyMap(sd)
    km.copy("tokens", "emb")
    km.head("lm_head", "head", tied_to="tokens", tied=True)
    out = km.result()
    assert out["lm_head"] is out["tokens"]
    sd["head"] = torch.zeros(4, 2)
    km = KeyMap(sd)
    km.copy("tokens", "emb")
    with pytest.raises(ConversionError, match="'head' differs .*tie_word_embeddings"):
        km.head("lm_head", "head", tied_to="tokens", tied=True)


def test_zero_parts_of_a_fused_bias():
    sd = {"q.bias": torch.ones(2), "v.bias": torch.full((2,), 3.0)}
    km = KeyMap(sd)
    km.cat("qkv.bias", ["q.bias", None, "v.bias"])
    assert km.result()["qkv.bias"].tolist() == [1, 1, 0, 0, 3, 3]


def test_whisper_uses_the_bart_layer_map(tmp_path):
    """One layer map for both: Whisper's layer keys are exactly BART's, without the key-projection bias."""
    bart_sd = save_family(tmp_path / "bart", "bart").state_dict()
    whisper_sd = save_family(tmp_path / "whisper", "whisper").state_dict()

    def layer_keys(sd, prefix):
        return sorted(k[len(prefix):] for k in sd if k.startswith(prefix))

    b = layer_keys(bart_sd, "model.decoder.layers.0.")
    w = layer_keys(whisper_sd, "model.decoder.layers.0.")
    assert set(w) == set(b) - {"self_attn.k_proj.bias", "encoder_attn.k_proj.bias"}
    km = KeyMap({k: whisper_sd["model.decoder.layers.0." + k] for k in w})
    bart_layer(km, decoder=True, k_bias=False)
    kv_bias = km.result()["cross.kv.bias"]
    assert kv_bias[: kv_bias.numel() // 2].abs().sum() == 0  # the key half: zeros


def test_whisper_refuses_a_key_bias_it_would_drop(tmp_path):
    hf = save_family(tmp_path, "whisper")
    sd = dict(hf.state_dict())
    sd["model.encoder.layers.0.self_attn.k_proj.bias"] = torch.ones(32)
    _, config = huggingface.config_from_hf(hf.config.to_dict())
    with pytest.raises(ConversionError, match=r"not used.*encoder\.layers\.0\.self_attn\.k_proj\.bias"):
        huggingface.whisper(sd, config)
