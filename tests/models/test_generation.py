"""Decoding: the KV cache changes nothing, padding changes nothing, sampling is controlled."""

import pytest
import torch
from hf_models import pair, vocab

import qkv
from qkv.nn import KVCache


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-mqa-tied"])
def test_cached_decoding_equals_full_forward(name):
    _, model = pair(name)
    ids = torch.randint(3, vocab(name), (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config.n_layers, capacity=4)  # small: forces the buffers to grow
        steps = [model(ids[:, :6], cache=cache).logits]
        for t in range(6, 15):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_cached_seq2seq_decoding_equals_full_forward(name):
    _, model = pair(name)
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(3, vocab(name), (2, 9), generator=g), torch.randint(3, vocab(name), (2, 8), generator=g)
    mask = torch.ones_like(src)
    mask[1, 6:] = 0
    with torch.no_grad():
        full = model(src, mask, decoder_input_ids=tgt).logits
        enc = model.encode(src, mask)
        cache = KVCache(len(model.decoder.layers))
        steps = [model(attention_mask=mask, decoder_input_ids=tgt[:, t : t + 1], encoder_output=enc, cache=cache).logits
                 for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bart"])
def test_padded_batch_generation_equals_one_at_a_time(name):
    _, model = pair(name)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, vocab(name), (n,), generator=g) for n in (3, 9, 6)]
    causal = model.config.__class__.__name__ == "CausalLMConfig"
    T = max(len(p) for p in prompts)
    ids = torch.full((3, T), 0, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(T - len(p), T) if causal else slice(0, len(p))  # decoders pad left, encoders right
        ids[i, sl], mask[i, sl] = p, 1
    batch = model.generate(ids, mask, max_new_tokens=10, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10, eos_token_id=[])
        new_batch = batch[i, T:] if causal else batch[i]
        new_alone = alone[0, len(p):] if causal else alone[0]
        assert torch.equal(new_batch, new_alone), (i, new_batch.tolist(), new_alone.tolist())


def test_sampling_controls():
    _, model = pair("gpt2")
    ids = torch.randint(3, 120, (2, 5), generator=torch.Generator().manual_seed(3))
    greedy = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=5, eos_token_id=[]), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=5, eos_token_id=[]), greedy)
    a = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=2.0, seed=7, eos_token_id=[])
    b = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=2.0, seed=7, eos_token_id=[])
    c = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=2.0, seed=8, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, do_sample=True, top_p=1.5)


def test_generation_stops_at_eos_and_pads():
    _, model = pair("gpt2")
    ids = torch.randint(3, 120, (2, 5), generator=torch.Generator().manual_seed(4))
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    stop = int(free[0, 7])  # the third token sequence 0 generates becomes its stop token
    out = model.generate(ids, max_new_tokens=6, eos_token_id=stop, pad_token_id=0)
    row = out[0, 5:].tolist()
    cut = row.index(stop)
    assert row[: cut + 1] == free[0, 5 : 5 + cut + 1].tolist() and all(t == 0 for t in row[cut + 1 :])


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "bart"])
@pytest.mark.parametrize("backend", ["eager", "chunked", "sdpa"])
def test_swapping_the_attention_backend_keeps_outputs(name, backend):
    _, model = pair(name)
    ids = torch.randint(3, vocab(name), (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    kw = {"decoder_input_ids": ids[:, :4]} if name in ("t5", "bart") else {}
    with torch.no_grad():
        ref = model(ids, mask, **kw).last_hidden_state
        try:
            model.set_backend(backend)
            assert model.backend == backend
            got = model(ids, mask, **kw).last_hidden_state
        finally:
            model.set_backend("auto")
    valid = mask.bool() if not kw else slice(None)
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("warp-drive")


@pytest.mark.parametrize("width", [2, 4])
def test_token_conv_cached_and_padded_decoding(width):
    """A model with a short token convolution: the cache carries its inputs, padding stays zero."""
    from qkv.models import CausalLM, CausalLMConfig

    torch.manual_seed(0)
    model = CausalLM(CausalLMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_positions=64,
                                    token_conv=width)).init_weights().eval()
    ids = torch.randint(3, 50, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(2, capacity=4)
        steps = [model(ids[:, :5], cache=cache).logits]
        for t in range(5, 13):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the convolution is live: the previous token changes the next logits
        conv_off = CausalLM(model.config).eval()
        conv_off.load_state_dict(model.state_dict())
        conv_off.token_conv.weight.zero_()
        assert not torch.allclose(conv_off(ids).logits, full, atol=1e-4)
    prompts = [ids[0, :4], ids[1, :9]]
    batch_ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch_ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    batch = model.generate(batch_ids, mask, max_new_tokens=6, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=6, eos_token_id=[])
        assert torch.equal(batch[i, 9:], alone[0, len(p):])
    with pytest.raises(ValueError, match="token_conv"):
        CausalLMConfig(token_conv=1)
