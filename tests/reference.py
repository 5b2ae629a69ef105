"""An independent float64 attention reference for the tests (not the library's eager backend)."""

import torch


def reference(q, k, v, *, mask=None, bias=None, score_mod=None, scale=None, q_offset=None):
    """Dense float64 attention. `mask` is a dense bool tensor broadcastable to (B, Hq, Tq, Tk).

    Returns out, weights, lse; differentiable (fully masked rows give 0 and zero gradient).
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q_offset = Tk - Tq if q_offset is None else q_offset
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if score_mod is not None:
        b = torch.arange(B).view(-1, 1, 1, 1)
        h = torch.arange(Hq).view(1, -1, 1, 1)
        qp = (torch.arange(Tq) + q_offset).view(1, 1, -1, 1)
        kp = torch.arange(Tk).view(1, 1, 1, -1)
        s = score_mod(s, b, h, qp, kp)
    if bias is not None:
        s = s + bias.double()
    if mask is None:
        mask = torch.ones(1, 1, Tq, Tk, dtype=torch.bool)
    mask = mask.expand(B, Hq, Tq, Tk)
    live = mask.any(-1, keepdim=True)
    s = torch.where(mask, s, float("-inf"))
    lse = torch.where(live.squeeze(-1), torch.logsumexp(torch.where(live, s, 0.0), -1), float("-inf"))
    p = torch.softmax(torch.where(live, s, 0.0), -1) * live
    return p @ v, p, lse
