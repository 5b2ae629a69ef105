"""Building and loading qkv's native CPU kernel for interval masks (`kernel.cpp`), on first use.

Masks under which every query row sees one contiguous key range (causal, sliding
windows, documents, padding, prefix-LM, and their intersections) are served in
the forward pass by one C++ kernel: exact per-row bounds instead of a mask
tensor, the output written in place, PyTorch's own BLAS for the GEMMs. It is
compiled once per machine with the host's C++ compiler (about a second) into
``$QKV_CACHE/native`` (default ``~/.cache/qkv/native``) and loaded with ctypes.

Where there is no compiler, no BLAS in the torch build, or ``QKV_NATIVE=0`` is
set, `available()` is False and the registry does not offer the `native`
backend (`auto` picks `chunked` instead); nothing else changes. `status()` says
which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("kernel.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
_LOCK = threading.Lock()
_STATE: dict = {}
DTYPES = (torch.float32, torch.float64)


def _cache_dir() -> Path:
    root = os.environ.get("QKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qkv")
    return Path(root) / "native"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), cxx, version, " ".join(_FLAGS), platform.machine(), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"qkv_native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run([cxx, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders each publish a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _blas() -> tuple[int, int]:
    """Addresses of the BLAS sgemm_/dgemm_ that this torch build links (MKL or OpenBLAS)."""
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        lib = ctypes.CDLL(str(path))
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value, ctypes.cast(lib.dgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        raise RuntimeError(f"this torch build exports no BLAS sgemm_/dgemm_ from {path.name}") from None


def _load() -> dict:
    if os.environ.get("QKV_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return {"ok": False, "why": "disabled by QKV_NATIVE=0"}
    if platform.system() != "Linux":
        return {"ok": False, "why": f"built only on Linux (this is {platform.system()})"}
    cxx = _compiler()
    if cxx is None:
        return {"ok": False, "why": "no C++ compiler found (set CXX, or install g++)"}
    try:
        sgemm, dgemm = _blas()
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return {"ok": False, "why": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}
    P, F64, INT = ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    fn = lib.qkv_interval_attention
    fn.restype = INT
    fn.argtypes = [INT, P, *([P] * 5), P, P, P, P, P, F64, INT]
    bwd = lib.qkv_interval_attention_backward
    bwd.restype = INT
    bwd.argtypes = [INT, P, *([P] * 10), P, P, P, P, P, P, F64, INT]
    bf16 = lib.qkv_interval_attention_bf16
    bf16.restype = INT
    bf16.argtypes = [*([P] * 5), P, P, P, P, P, F64, INT]
    has_bf16 = bool(lib.qkv_native_bf16())
    return {"ok": True, "fn": fn, "fn_backward": bwd, "fn_bf16": bf16 if has_bf16 else None,
            "gemm": {torch.float32: sgemm, torch.float64: dgemm}, "why": "",
            "dtypes": DTYPES + ((torch.bfloat16,) if has_bf16 else ())}


def _state() -> dict:
    if not _STATE:
        with _LOCK:
            if not _STATE:
                _STATE.update(_load())
    return _STATE


def available() -> bool:
    """Whether the native kernel is built and loadable here (builds it on the first call)."""
    return _state()["ok"]


def status() -> str:
    """'ready', or why the native kernel is not used."""
    s = _state()
    return "ready" if s["ok"] else s["why"]


def dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes this machine's build takes: float32 and float64, and bfloat16 where the CPU has AVX-512 BF16."""
    return _state().get("dtypes", ())


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can take these inputs (CPU, one of `dtypes`, same dtype); builds it if needed."""
    return (
        q.device.type == "cpu"
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and available()
        and q.dtype in dtypes()
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """BLAS reads rows as (row stride >= features, unit feature stride) matrices."""
    if x.stride(-1) == 1 and x.stride(-2) >= x.shape[-1]:
        return x
    return x.contiguous()


def _bounds(lo: torch.Tensor, hi: torch.Tensor, B: int, Hq: int, Tq: int):
    """Row bounds as contiguous int64 (B', H', Tq, R) and the kernel's {batch stride, head stride, R}."""
    if lo.dim() == 2:  # (B', Tq): one interval per row, shared by the heads
        lo, hi = lo[:, None, :, None], hi[:, None, :, None]
    if lo.dim() != 4 or lo.shape != hi.shape or lo.shape[0] not in (1, B) or lo.shape[1] not in (1, Hq) \
            or lo.shape[2] != Tq or lo.shape[3] < 1:
        raise ValueError(f"interval bounds must be (B' in {{1, {B}}}, Tq={Tq}) or (B', H' in {{1, {Hq}}}, Tq, R>=1); "
                         f"got lo {tuple(lo.shape)}, hi {tuple(hi.shape)}")
    lo = lo.to(torch.int64).contiguous()
    hi = hi.to(torch.int64).contiguous()
    R = lo.shape[3]
    meta = (ctypes.c_int64 * 3)(Tq * R * lo.shape[1] if lo.shape[0] > 1 else 0, Tq * R if lo.shape[1] > 1 else 0, R)
    return lo, hi, meta


def _dims(q, k, v, out, lse):
    B, Hq, Tq, D = q.shape
    dims = (ctypes.c_int64 * 7)(B, Hq, k.shape[1], Tq, k.shape[2], D, v.shape[-1])
    strides = (ctypes.c_int64 * 14)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                                    *lse.stride()[:2])
    return dims, strides


def _rejected(rc: int, q, k, v):
    return RuntimeError(f"qkv native kernel rejected the call (code {rc}): shapes q {tuple(q.shape)}, "
                        f"k {tuple(k.shape)}, v {tuple(v.shape)}")


@torch.library.custom_op("qkv::interval_attention", mutates_args=())
def interval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where row i of batch entry b, head h sees the keys of the intervals
    ``lo[b, h, i, r] <= k <= hi[b, h, i, r]`` (r < R; empty where lo > hi).

    q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), all float32 or all
    float64 on the CPU (or bfloat16, `dtypes`, with R = 1); lo/hi int64 (B', H', Tq, R)
    with B' in {1, B} and H' in {1, Hq}, or (B', Tq) for one interval per row. Returns
    out (B, Hq, Tq, Dv), laid out (B, Tq, Hq, Dv) in memory, and lse (B, Hq, Tq) (-inf on
    rows that see no key, whose output is 0). A PyTorch custom op
    (``torch.ops.qkv.interval_attention``) so that torch.compile keeps it whole; no
    autograd: callers wrap it (`interval_attention_backward` gives the gradients).
    """
    s = _state()
    B, Hq, Tq, D = q.shape
    Dv = v.shape[-1]
    q, k, v = _rows(q), _rows(k), _rows(v)
    lo, hi, meta = _bounds(lo, hi, B, Hq, Tq)
    half = q.dtype == torch.bfloat16
    out = torch.empty(B, Tq, Hq, Dv, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32 if half else q.dtype)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    dims, strides = _dims(q, k, v, out, lse)
    rest = (lo.data_ptr(), hi.data_ptr(), meta, dims, strides, float(scale), torch.get_num_threads())
    if half:
        if s.get("fn_bf16") is None:
            raise RuntimeError("this build of qkv's native kernel has no bfloat16 path (the CPU lacks AVX-512 BF16)")
        if lo.shape[3] != 1:
            raise ValueError(f"the bfloat16 kernel takes one interval per row; got R={lo.shape[3]}")
        rc = s["fn_bf16"](q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), *rest)
    else:
        rc = s["fn"](int(q.dtype == torch.float64), s["gemm"][q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                     out.data_ptr(), lse.data_ptr(), *rest)
    if rc != 0:
        raise _rejected(rc, q, k, v)
    return out, lse


@interval_attention.register_fake
def _(q, k, v, lo, hi, scale):
    B, Hq, Tq = q.shape[:3]
    out = q.new_empty(B, Tq, Hq, v.shape[-1]).transpose(1, 2)
    return out, q.new_empty(B, Hq, Tq, dtype=torch.float32 if q.dtype == torch.bfloat16 else q.dtype)


@torch.library.custom_op("qkv::interval_attention_backward", mutates_args=())
def interval_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None, lo: torch.Tensor,
                                hi: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of `interval_attention` (float32 or float64) from its inputs, its saved ``out``
    and ``lse``, the output's gradient ``dout`` and the lse's gradient ``dlse`` (None: zero). The
    probabilities are recomputed from ``lse`` block by block (FlashAttention-2's backward), never stored."""
    s = _state()
    if q.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the native backward takes float32 or float64; got {q.dtype}")
    B, Hq, Tq, D = q.shape
    q, k, v, out, dout = _rows(q), _rows(k), _rows(v), _rows(out), _rows(dout)
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.to(lse.dtype).contiguous()
    lo, hi, meta = _bounds(lo, hi, B, Hq, Tq)
    dq, dk, dv = torch.zeros(q.shape, dtype=q.dtype), torch.zeros(k.shape, dtype=k.dtype), \
        torch.zeros(v.shape, dtype=v.dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk, dv
    dims, strides = _dims(q, k, v, out, lse)
    sdo = (ctypes.c_int64 * 3)(*dout.stride()[:3])
    rc = s["fn_backward"](int(q.dtype == torch.float64), s["gemm"][q.dtype], q.data_ptr(), k.data_ptr(),
                          v.data_ptr(), out.data_ptr(), lse.data_ptr(), dout.data_ptr(),
                          None if dlse is None else dlse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                          lo.data_ptr(), hi.data_ptr(), meta, dims, strides, sdo, float(scale),
                          torch.get_num_threads())
    if rc != 0:
        raise _rejected(rc, q, k, v)
    return dq, dk, dv


@interval_attention_backward.register_fake
def _(q, k, v, out, lse, dout, dlse, lo, hi, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
