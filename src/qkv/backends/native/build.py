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
    fn = lib.qkv_interval_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, *([ctypes.c_void_p] * 5), ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double, ctypes.c_int]
    bf16 = lib.qkv_interval_attention_bf16
    bf16.restype = ctypes.c_int
    bf16.argtypes = [*([ctypes.c_void_p] * 5), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_double, ctypes.c_int]
    has_bf16 = bool(lib.qkv_native_bf16())
    return {"ok": True, "fn": fn, "fn_bf16": bf16 if has_bf16 else None,
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


@torch.library.custom_op("qkv::interval_attention", mutates_args=())
def interval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where row i of batch entry b sees keys ``lo[b, i] <= k <= hi[b, i]``.

    q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), all float32 or all
    float64 on the CPU; lo/hi int64 (B' in {1, B}, Tq). Returns out (B, Hq, Tq, Dv),
    laid out (B, Tq, Hq, Dv) in memory, and lse (B, Hq, Tq) (-inf on rows that see
    no key, whose output is 0). A PyTorch custom op (``torch.ops.qkv.interval_attention``)
    so that torch.compile keeps it whole; no autograd: callers wrap it.
    """
    s = _state()
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = _rows(q), _rows(k), _rows(v)
    lo = lo.to(torch.int64).contiguous()
    hi = hi.to(torch.int64).contiguous()
    half = q.dtype == torch.bfloat16
    out = torch.empty(B, Tq, Hq, Dv, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32 if half else q.dtype)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    dims = (ctypes.c_int64 * 7)(B, Hq, Hkv, Tq, Tk, D, Dv)
    strides = (ctypes.c_int64 * 14)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                                    *lse.stride()[:2])
    bounds = (lo.data_ptr(), hi.data_ptr(), Tq if lo.shape[0] > 1 else 0, dims, strides, float(scale),
              torch.get_num_threads())
    if half:
        if s.get("fn_bf16") is None:
            raise RuntimeError("this build of qkv's native kernel has no bfloat16 path (the CPU lacks AVX-512 BF16)")
        rc = s["fn_bf16"](q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), *bounds)
    else:
        rc = s["fn"](int(q.dtype == torch.float64), s["gemm"][q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                     out.data_ptr(), lse.data_ptr(), *bounds)
    if rc != 0:
        raise RuntimeError(f"qkv native kernel rejected the call (code {rc}): shapes q {tuple(q.shape)}, "
                           f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    return out, lse


@interval_attention.register_fake
def _(q, k, v, lo, hi, scale):
    B, Hq, Tq = q.shape[:3]
    out = q.new_empty(B, Tq, Hq, v.shape[-1]).transpose(1, 2)
    return out, q.new_empty(B, Hq, Tq, dtype=torch.float32 if q.dtype == torch.bfloat16 else q.dtype)
