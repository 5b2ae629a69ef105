"""`Tokenizer`: text <-> ids with the `tokenizers` library, plus the special tokens and padding models need."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer as _Tok

from ..models.chat import SPECIAL_TOKENS, ChatTemplate, special_tokens
from ._files import read_json


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the other 68 for
    the code points from U+0100 on, in byte order (Radford et al. 2019)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table.values()):
        table[chr(0x100 + n)] = b
    return table


def _is_byte_level(tok: _Tok) -> bool:
    try:
        spec = json.loads(tok.to_str()).get("decoder") or {}
    except (ValueError, TypeError):
        return False
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    return any(p.get("type") == "ByteLevel" for p in parts if isinstance(p, dict))


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens of its checkpoint.

    Padding and truncation are done here (not by the tokenizer file's own
    settings), so each call says what it wants: right padding for encoders,
    left padding for batched generation.
    """

    def __init__(self, tokenizer: _Tok, *, pad_token: str | None = None, eos_token: str | None = None,
                 bos_token: str | None = None, max_length: int | None = None,
                 chat_template: ChatTemplate | None = None):
        self.tok = tokenizer
        self.chat_template = chat_template
        self._specials: dict[str, str] = {}  # every named special token of the folder (unk, sep, cls, mask...)
        self.tok.no_padding()
        self.tok.no_truncation()
        self.max_length = max_length
        self._byte_level: bool | None = None  # decided on first use by token_texts
        self.pad_token, self.eos_token, self.bos_token = pad_token, eos_token, bos_token

    @classmethod
    def from_file(cls, path: str | Path, max_length: int | None = None) -> Tokenizer:
        """From ``tokenizer.json`` or a folder holding it (with ``tokenizer_config.json`` and
        ``special_tokens_map.json`` when present, as Hugging Face saves them)."""
        path = Path(path)
        folder, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        special: dict = special_tokens(folder)
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
        special["model_max_length"] = config.get("model_max_length")
        limit = special.get("model_max_length")
        if max_length is None and isinstance(limit, int) and limit < 1_000_000:
            max_length = limit
        try:
            tok = _Tok.from_file(str(file))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exceptions for unreadable files
            raise ValueError(f"{file}: not a tokenizer file the tokenizers library can read ({e}); it may be "
                             "damaged or from a newer version: save it again with tokenizers or transformers") from None
        out = cls(tok, pad_token=special.get("pad_token"), eos_token=special.get("eos_token"),
                  bos_token=special.get("bos_token"), max_length=max_length,
                  chat_template=ChatTemplate.from_folder(folder))
        out._specials = {k: v for k, v in special.items() if isinstance(v, str)}
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        cfg = {k: v for k, v in (("pad_token", self.pad_token), ("eos_token", self.eos_token),
                                 ("bos_token", self.bos_token), ("model_max_length", self.max_length)) if v is not None}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        if self.chat_template is not None:
            self.chat_template.save(folder)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False, tokenize: bool = True, tools=None,
                            documents=None, chat_template: str | None = None, **variables) -> list[int] | str:
        """A conversation as the model's prompt, as transformers' ``apply_chat_template``: the text
        (``tokenize=False``) or its token ids, encoded without adding special tokens a second time
        (the template writes them). See `qkv.models.chat.ChatTemplate.render` for the options."""
        template = self.chat_template
        if template is None:
            if chat_template is None:
                raise ValueError("this tokenizer has no chat template (no chat_template.jinja and no chat_template "
                                 "in tokenizer_config.json): pass chat_template= the Jinja text, or set "
                                 "tokenizer.chat_template = qkv.models.chat.ChatTemplate(text)")
            template = ChatTemplate(chat_template, special_tokens=self.special_texts())
            chat_template = None
        text = template.render(messages, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message, tools=tools, documents=documents,
                               chat_template=chat_template, **variables)
        if not tokenize:
            return text
        if isinstance(text, list):  # a batch of conversations
            return [self.encode(t, add_special_tokens=False) for t in text]
        return self.encode(text, add_special_tokens=False)

    def special_texts(self) -> dict[str, str]:
        """The named special tokens a template sees: those of the folder, else pad/eos/bos as set here."""
        named = {k: v for k, v in self._specials.items() if k in SPECIAL_TOKENS}
        for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token), ("pad_token", self.pad_token)):
            if v is not None:
                named[k] = v
        return named

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def pad_id(self) -> int:
        """Id used for padding: the pad token, else the end token, else 0."""
        for t in (self.pad_token, self.eos_token):
            i = self._id(t)
            if i is not None:
                return i
        return 0

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_types(self, text: str) -> tuple[list[int], list[int]]:
        """``(ids, type_ids)`` of one text, special tokens included (the segment ids BERT-style models read)."""
        e = self.tok.encode(text)
        return e.ids, e.type_ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """The text each token stands for: byte-level BPE pieces as the bytes they encode (``Ġbank`` is
        `` bank``; a byte that is not valid UTF-8 on its own is kept with ``errors="surrogateescape"``),
        SentencePiece's ``▁`` as a space, byte-fallback tokens (``<0x0A>``) as their byte; special
        tokens as written."""
        ids = [int(i) for i in ids]
        raw = [self.tok.id_to_token(i) or "" for i in ids]
        if self._byte_level is None:
            self._byte_level = _is_byte_level(self.tok)
        if self._byte_level:
            table = _byte_level_table()
            return [bytes(table[c] for c in t).decode("utf-8", "surrogateescape") if all(c in table for c in t)
                    else t for t in raw]
        decoded = self.tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
        # decoders strip a leading space from the first token of a text; a lone space piece decodes to ""
        return [d if d.strip() or not t else t.replace("\u2581", " ") for d, t in zip(decoded, raw)]

    def _encode(self, texts: Sequence[str], limit: int | None, add_special_tokens: bool = True):
        if isinstance(texts, str):
            raise TypeError("pass a list of strings; wrap a single text in a list")
        if limit:
            self.tok.enable_truncation(limit)
        try:
            return self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        finally:
            self.tok.no_truncation()

    def _pad(self, encs, padding_side: str, device) -> dict[str, torch.Tensor]:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r} must be 'right' or 'left'")
        width = max((len(e.ids) for e in encs), default=0)
        ids = torch.full((len(encs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        types = torch.zeros((len(encs), width), dtype=torch.long)
        for i, e in enumerate(encs):
            n = len(e.ids)
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[i, sl] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, sl] = 1
            types[i, sl] = torch.tensor(e.type_ids, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def encode_batch(self, texts: Sequence[str], *, max_length: int | None = None, padding_side: str = "right",
                     add_special_tokens: bool = True, device=None) -> dict[str, torch.Tensor]:
        """Tokenize, truncate to ``max_length`` (default: the checkpoint's) and pad to the longest.

        Returns ``input_ids``, ``attention_mask`` (1 = real token) and
        ``token_type_ids``, each (B, T) int64.
        """
        encs = self._encode(texts, max_length or self.max_length, add_special_tokens)
        return self._pad(encs, padding_side, device)

    def length_batches(self, texts: Sequence[str], batch_size: int, max_length: int | None = None,
                       device=None) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Batches of similar length: yields (indices into texts, encoded batch), longest first."""
        encs = self._encode(texts, max_length or self.max_length)
        order = sorted(range(len(encs)), key=lambda i: -len(encs[i].ids))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            yield torch.tensor(idx), self._pad([encs[i] for i in idx], "right", device)
