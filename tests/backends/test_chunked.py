"""The chunked backend at sizes where its plans matter: bands, long rows, memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from reference import reference

import qkv
from qkv.backends.chunked.plan import call_plan


@pytest.mark.parametrize(
    "mask,T,Hq,Hkv",
    [
        (qkv.masks.sliding_window(100), 700, 4, 4),  # bands of 32-row tiles
        (qkv.masks.sliding_window(37, 5), 600, 4, 2),  # right context, GQA
        (qkv.masks.causal() & qkv.masks.sliding_window(64), 513, 2, 1),  # ragged end, MQA
    ],
)
@pytest.mark.parametrize("backend", ["native", "chunked"])  # chunked: the fused-kernel bands
def test_band_plans_match_reference(mask, T, Hq, Hkv, backend):
    if not qkv.backends.available()[backend].available:
        pytest.skip(f"{backend}: {qkv.backends.available()[backend].reason}")
    plan = call_plan(mask, 0, T, T, 2, Hq, torch.device("cpu"))
    assert plan.bands and sum(b.count * b.q_tile for b in plan.bands) > T // 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, Hq, T, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(2, Hkv, T, 32, generator=g, requires_grad=True) for _ in range(2))
    out, lse = qkv.attention(q, k, v, mask=mask, backend=backend, return_lse=True)
    go = torch.randn_like(out)
    out.backward(go)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _, ref_lse = reference(qr, kr, vr, mask=mask.materialize(T, T))
    ref.backward(go.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    for t, r in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=1e-4, rtol=1e-4)


def test_plan_visits_only_the_window():
    plan = call_plan(qkv.masks.sliding_window(255), 0, 16384, 16384, 1, 8, torch.device("cpu"))
    assert plan.visited < 16384 * (256 + 64 + 16)  # ~ the window, not the square
    assert call_plan(None, 0, 100, 100, 1, 1, torch.device("cpu")).density == 1.0


def test_long_window_forward_backward_memory_is_linear():
    """T=32768 fwd+bwd: dense scores would be 34 GB; the chunked path stays well under 1.5 GB."""
    code = textwrap.dedent("""
        import json, torch, qkv
        T = 32768
        q, k, v = (torch.randn(1, 8, T, 64, requires_grad=True) for _ in range(3))
        out = qkv.attention(q, k, v, mask=qkv.masks.sliding_window(255))
        out.backward(torch.ones_like(out))
        hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
        print(json.dumps({"mb": int(hwm) / 1024, "finite": bool(torch.isfinite(k.grad).all())}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["finite"] and got["mb"] < 1500, got


def test_topk_weights_long_input_equals_full_topk():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 3000, 16, generator=g), torch.randn(1, 2, 3000, 16, generator=g)
    mask = qkv.masks.causal() & qkv.masks.sliding_window(700)
    vals, idx = qkv.attention_weights(q, k, mask=mask, topk=8)
    full = qkv.attention_weights(q, k, mask=mask)
    ref_vals, _ = full.topk(8, dim=-1)
    torch.testing.assert_close(vals, ref_vals)
    torch.testing.assert_close(torch.where(idx >= 0, full.gather(-1, idx.clamp(min=0)), 0.0), vals)
    assert torch.all((idx >= 0) == (vals > 0))  # -1 marks "no visible key", never a masked one
    rows = torch.tensor([0, 1, 2999, 1500])
    torch.testing.assert_close(qkv.attention_weights(q, k, mask=mask, rows=rows), full[:, :, rows])


def test_plans_never_go_stale():
    """Masks snapshot their tensors; functions and tensors passed directly are never cached."""
    q = k = v = torch.randn(1, 2, 200, 16)
    lengths = torch.tensor([150])
    mask = qkv.masks.padding(lengths)
    before = qkv.attention(q, k, v, mask=mask, backend="chunked")
    lengths[0] = 20  # the mask keeps its own copy
    torch.testing.assert_close(qkv.attention(q, k, v, mask=mask, backend="chunked"), before)

    state = {"n": 150}
    fn = lambda b, h, qp, kp: kp < state["n"]  # noqa: E731
    first = qkv.attention(q, k, v, mask=fn, backend="chunked")
    state["n"] = 20
    second = qkv.attention(q, k, v, mask=fn, backend="chunked")
    ref = qkv.attention(q, k, v, mask=qkv.masks.padding([20]), backend="eager")
    torch.testing.assert_close(second, ref)
    assert not torch.allclose(first, second)

    t = torch.ones(200, 200, dtype=torch.bool)
    tm = qkv.masks.from_tensor(t)
    qkv.attention(q, k, v, mask=tm, backend="chunked")
    t[:, 20:] = False
    torch.testing.assert_close(qkv.attention(q, k, v, mask=tm, backend="chunked"), ref)
