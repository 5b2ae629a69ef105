"""OpenAI's request fields, checked and turned into qkv options, and its response shapes.

Every check names the field it refuses (``param``), so the `openai` client's `BadRequestError` says
what to change. Fields qkv does not implement are refused when set to anything but their no-op value,
never silently ignored.
"""

from __future__ import annotations

import base64
import math
import secrets
import time

import numpy as np

from .errors import bad_field

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings, as OpenAI
MAX_INPUTS = 2048  # texts per embeddings request, as OpenAI


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def number(body: dict, name: str, lo: float, hi: float, default=None):
    """``body[name]`` as a finite number in [lo, hi] (``default`` when absent or null)."""
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not lo <= v <= hi:
        raise bad_field(name, f"must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def integer(body: dict, name: str, lo: int, hi: int, default=None):
    """``body[name]`` as an int in [lo, hi] (``default`` when absent or null)."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad_field(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_field(name, f"must be true or false, got {v!r}")
    return v


def unsupported(body: dict, names_and_noops: dict) -> None:
    """Refuse fields qkv does not implement unless they hold their no-op value."""
    for name, noops in names_and_noops.items():
        v = body.get(name)
        if v is not None and v not in noops:
            raise bad_field(name, f"is not supported by this server (got {v!r}); leave it out")


# -- inputs ---------------------------------------------------------------------------------------------------


def texts(body: dict, name: str) -> list[str]:
    """A string or a non-empty list of strings (``input`` of embeddings, ``prompt`` of completions)."""
    v = body.get(name)
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(isinstance(s, str) for s in v):
        return list(v)
    if isinstance(v, list) and v and all(isinstance(s, int) and not isinstance(s, bool) for s in v):
        raise bad_field(name, "token-id arrays are not supported; send the text")
    raise bad_field(name, f"must be a string or a non-empty list of strings, got {type(v).__name__}")


def encoding_format(body: dict) -> str:
    v = body.get("encoding_format") or "float"
    if v not in ("float", "base64"):
        raise bad_field("encoding_format", f"must be 'float' or 'base64', got {v!r}")
    return v


_ROLES = ("system", "developer", "user", "assistant", "tool")


def messages(body: dict) -> list[dict]:
    """Chat messages with string content (a list of ``{"type": "text"}`` parts is joined)."""
    v = body.get("messages")
    if not isinstance(v, list) or not v:
        raise bad_field("messages", "must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_field(where, f"must be an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise bad_field(f"{where}.role", f"must be one of {list(_ROLES)}, got {role!r}")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_field(f"{where}.content", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                "are supported")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad_field(f"{where}.content", f"must be a string, got {type(content).__name__}")
        msg = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or len(v) > MAX_STOP or not all(isinstance(s, str) and s for s in v):
        raise bad_field("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them, got {v!r}")
    return v


def sampling(body: dict, defaults: dict) -> dict:
    """OpenAI's sampling fields as `qkv.models.GenerationConfig` options.

    ``temperature`` 0 is greedy decoding; absent, the checkpoint's generation defaults decide when they
    say whether to sample, else OpenAI's default (sampling at temperature 1).
    """
    temperature = number(body, "temperature", 0.0, 2.0)
    top_p = number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise bad_field("top_p", f"must be in (0, 1], got {top_p!r}; use temperature 0 for greedy decoding")
    opts = {"presence_penalty": number(body, "presence_penalty", -2.0, 2.0),
            "frequency_penalty": number(body, "frequency_penalty", -2.0, 2.0),
            "seed": integer(body, "seed", 0, 2**63 - 1), "top_p": top_p if top_p != 1.0 else None}
    if temperature == 0:
        opts["do_sample"] = False
    elif temperature is not None:
        opts.update(do_sample=True, temperature=temperature)
    elif "do_sample" not in defaults:
        opts.update(do_sample=True, temperature=1.0)
    return {k: v for k, v in opts.items() if v is not None}


# -- responses ------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def model_list(served: dict) -> dict:
    created = now()
    return {"object": "list", "data": [model_card(n, s, created) for n, s in served.items()]}


def model_card(name: str, served, created: int | None = None) -> dict:
    """OpenAI's model object, plus ``"qkv": {"tasks": [...], "type": ...}``: which routes the model serves
    ("embeddings", "completions", "chat", "classify", "transcriptions") and its qkv class."""
    return {"id": name, "object": "model", "created": created or now(), "owned_by": "qkv",
            "qkv": {"tasks": list(served.tasks), "type": type(served.model).__name__}}


def embedding_list(model: str, vectors: np.ndarray, fmt: str, prompt_tokens: int) -> dict:
    """OpenAI's embeddings response; base64 is the little-endian float32 bytes, as OpenAI sends them."""
    data = []
    for i, v in enumerate(vectors):
        if fmt == "base64":
            emb = base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
        else:
            emb = np.ascontiguousarray(v, dtype=np.float32)  # FastJSON writes it as a list
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model, "usage": usage(prompt_tokens, 0, embeddings=True)}


def usage(prompt_tokens: int, completion_tokens: int, embeddings: bool = False) -> dict:
    if embeddings:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, created: int, choices: list[tuple[str, str]], prompt_tokens: int,
               completion_tokens: int, chat: bool) -> dict:
    """A whole response: ``choices`` are (text, finish_reason) in index order."""
    if chat:
        rows = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": reason} for i, (text, reason) in enumerate(choices)]
    else:
        rows = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                for i, (text, reason) in enumerate(choices)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": rows, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(rid: str, model: str, created: int, index: int | None, chat: bool, *, text: str | None = None,
          role: bool = False, finish_reason: str | None = None, usage_: dict | None = None,
          extra: dict | None = None) -> dict:
    """One server-sent event of a stream (``index=None``: the usage-only chunk, with no choices);
    ``extra`` goes in the choice as its ``qkv`` field (attention rows)."""
    choices = []
    if index is not None:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        else:
            choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
        if extra is not None:
            choices[0]["qkv"] = extra
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
