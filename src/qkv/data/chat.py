"""Chat data: JSONL conversations (``{"messages": [{"role": ..., "content": ...}, ...]}`` per line) as
next-token rows whose loss falls on the assistant's tokens only.

Each conversation is rendered with the chat template; `ChatTemplate.assistant_spans` gives the
characters each assistant turn wrote (its content and end-of-turn marker), and a token is labelled
when its first character (the tokenizer's offsets) lies in such a span. Everything else (system and
user turns, the role headers the template writes) is context: label `IGNORE`.

The template and tokenizer: ``data.chat_template`` names a Jinja file (a tokenizer of kind
``data.tokenizer`` is trained on the rendered conversations, with the template's ``<|...|>`` markers
added as special tokens), or a model / tokenizer folder (its tokenizer.json and chat template are
used as they are). Without it, `CHATML` is the template. The template travels with the tokenizer
(``tokenizer.chat_template``), so the trained model's folder holds ``chat_template.jinja``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..models.chat import ChatTemplate
from ..models.conversation import end_of_turn
from ..pretrained.tokenizer import Tokenizer
from .core import IGNORE, Data, DataError, split_rows
from .text import MAX_FIELD_CHARS, train_tokenizer

log = logging.getLogger(__name__)

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_MARKER = re.compile(r"<\|[^|<>\s]{1,64}\|>")  # <|im_start|>, <|eot_id|>, ...: special tokens a template writes


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSONL file; a line that is not ``{"messages": [...]}`` with string roles and
    contents and at least one assistant message is refused, naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; data.path must name a JSONL file of {{\"messages\": [...]}} lines")
    out = []
    try:
        with path.open(encoding="utf-8") as f:
            n = 0
            while line := f.readline(MAX_FIELD_CHARS + 2):
                n += 1
                if len(line.rstrip("\r\n")) > MAX_FIELD_CHARS:
                    raise DataError(f"{path}:{n}: the line is longer than {MAX_FIELD_CHARS:,} characters")
                if line.strip():
                    out.append(_conversation(line, path, n))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    if not out:
        raise DataError(f"{path}: no conversations")
    return out


def _conversation(line: str, path: Path, n: int) -> list[dict]:
    where = f"{path}:{n}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: expected {{"messages": [{{"role": "user", "content": ...}}, ...]}}, a non-empty '
                        "list of messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"]
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be {{\"role\": str, \"content\": str}}, got {m!r:.80}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn from this conversation; add the reply "
                        "or remove the line")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def template_and_tokenizer(cfg, conversations: list[list[dict]]) -> tuple[ChatTemplate, Tokenizer]:
    """The chat template and tokenizer ``cfg`` (a `DataConfig`) asks for (see the module docstring)."""
    source = cfg.chat_template
    if source is not None and Path(source).is_dir():
        folder = Path(source)
        if not (folder / "tokenizer.json").is_file():
            raise DataError(f"data.chat_template: {folder} is a folder without tokenizer.json; give a model or "
                            "tokenizer folder, or a Jinja template file")
        tok = Tokenizer.from_file(folder)
        if tok.chat_template is None:
            raise DataError(f"data.chat_template: {folder} has no chat template (chat_template.jinja or "
                            "tokenizer_config.json's chat_template); give a Jinja template file instead")
        return tok.chat_template, tok
    if source is not None and not Path(source).is_file():
        raise DataError(f"data.chat_template: {source!r} is neither a Jinja template file nor a tokenizer folder")
    text = Path(source).read_text(encoding="utf-8") if source is not None else CHATML
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    try:
        template = ChatTemplate(text, special_tokens=specials)
        rendered = [template.render(c) for c in conversations]
    except ValueError as e:
        raise DataError(f"data.chat_template: {e}") from None
    markers = sorted(set(_MARKER.findall(template.source)))  # from the template only: never from user text
    tok = train_tokenizer(cfg.tokenizer, [_MARKER.sub("", r) for r in rendered], cfg.vocab_size)
    tok.tok.add_special_tokens(markers)
    template = ChatTemplate(text, special_tokens={"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                                                  "pad_token": tok.pad_token})
    marker = end_of_turn(template)
    if marker is not None and len(tok.encode(marker, add_special_tokens=False)) == 1:
        tok.eos_token = marker  # generation stops at the end of the assistant's turn
    tok.chat_template = template
    return template, tok


def assistant_labels(template: ChatTemplate, tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """The conversation's token ids and, per token, whether an assistant span holds its first character."""
    text, spans = template.assistant_spans(messages)
    enc = tok.tok.encode(text, add_special_tokens=False)
    starts = [a for a, _ in enc.offsets]
    return list(enc.ids), [any(s <= a < e for s, e in spans) for a in starts]


def chat_data(cfg, seed: int) -> Data:
    """`Data` of rows ``input_ids``, ``labels`` (N, T): next-token labels on assistant tokens only, `IGNORE`
    elsewhere and in the padding; conversations longer than ``data.max_length`` tokens are cut there."""
    conversations = read_conversations(cfg.path)
    template, tok = template_and_tokenizer(cfg, conversations)
    rows, cut = [], 0
    for messages in conversations:
        ids, mine = assistant_labels(template, tok, messages)
        if len(ids) > cfg.max_length + 1:
            ids, mine, cut = ids[: cfg.max_length + 1], mine[: cfg.max_length + 1], cut + 1
        rows.append((ids, mine))
    if cut:
        log.warning("%d of %d conversations are longer than data.max_length=%d tokens and were cut there", cut,
                    len(rows), cfg.max_length)
    width = max(len(ids) for ids, _ in rows) - 1
    input_ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, mine) in enumerate(rows):
        t = torch.tensor(ids)
        input_ids[i, : len(ids) - 1] = t[:-1]
        labels[i, : len(ids) - 1] = torch.where(torch.tensor(mine[1:]), t[1:], IGNORE)
    if not bool((labels != IGNORE).any()):
        raise DataError(f"{cfg.path}: no assistant token within data.max_length={cfg.max_length}; raise it")
    table = {"input_ids": input_ids, "labels": labels}
    return Data("table", split_rows(table, cfg.val_fraction, cfg.test_fraction, seed), tok,
                info={"vocab_size": tok.vocab_size, "seq_len": width})
