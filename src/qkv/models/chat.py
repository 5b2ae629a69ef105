"""Chat templates: a conversation (a list of ``{"role", "content"}`` messages) rendered to the text a
chat model was trained on, exactly as `transformers`' ``apply_chat_template`` renders it.

A template is Jinja2 source shipped with the checkpoint (``chat_template.jinja``, or the
``chat_template`` field of ``tokenizer_config.json``). Templates come from the hub and are untrusted
code, so they run in Jinja2's immutable sandbox with the environment transformers gives them (and
nothing more): ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, the
``{% generation %}`` tag, a ``tojson`` filter that does not HTML-escape, and the globals
``raise_exception``, ``strftime_now``, a limited ``dict`` and a ``namespace`` that refuses
underscore names. Messages are copied to plain JSON data before the template sees them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# the special tokens a template sees by name (transformers' SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING = ("reasoning_content", "thinking", "reasoning")  # names a message's reasoning comes under
_CONTINUE = "QKV_CONTINUE_FINAL_MESSAGE "  # appended to the message to continue; the render is cut there


def _jinja():
    try:
        import jinja2
    except ImportError:  # pragma: no cover -- jinja2 is a dependency
        raise ImportError("chat templates need jinja2 >= 3.1.6: pip install 'jinja2>=3.1.6'") from None
    major, minor, patch = (int(p) if p.isdigit() else 0 for p in (jinja2.__version__.split(".") + ["0", "0"])[:3])
    if (major, minor, patch) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2 >= 3.1.6 (older releases have sandbox escapes), found "
                          f"{jinja2.__version__}: pip install -U 'jinja2>=3.1.6'")
    return jinja2


# (rendered pieces so far, spans) while a render tracks {% generation %} blocks
_TRACK: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("qkv_chat_track", default=None)


@lru_cache(maxsize=1)
def _environment():
    jinja2 = _jinja()
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: marks text the assistant produced (for training masks)."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

        def _block(self, caller):
            text = caller()
            track = _TRACK.get()
            if track is not None:
                start = sum(map(len, track[0]))
                track[1].append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class LimitedDict:
        """``dict(...)`` and ``dict.fromkeys(...)``, and nothing else of the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def _no_private(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not store the underscore-prefixed name "
                                                  f"{name!r} on a namespace")

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # jinja2's Namespace takes self this way too: namespace(self=...) works
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _no_private(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _no_private(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=LimitedDict(), namespace=Namespace)
    return env


@lru_cache(maxsize=32)
def _compile(source: str):
    jinja2 = _jinja()
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template: Jinja2 syntax error at line {e.lineno}: {e.message}") from None


def _plain(value: Any) -> Any:
    """A copy of ``value`` made of JSON types only (what a sandboxed template may see); other objects
    become an inert ``"<TypeName>"``: templates test media keys for presence, never read them."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) carry methods: strip them
        if isinstance(value, kind):
            return str.__str__(value) if kind is str else kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    numpy = sys.modules.get("numpy")  # numpy scalars (np.bool_(False) must not become a truthy string); arrays
    if numpy is not None and isinstance(value, numpy.generic):  # and tensors, 0-d ones too, stay placeholders
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. the openai client's messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _is_batch(messages) -> bool:
    """A list of conversations (each a list of messages, or an object with ``.messages``)."""
    return (isinstance(messages, (list, tuple)) and len(messages) > 0
            and (isinstance(messages[0], (list, tuple)) or hasattr(messages[0], "messages")))


def _messages(messages) -> list[dict]:
    """Plain message dicts, keys whose value is None dropped (as OpenAI clients send ``content=None``),
    reasoning available under each name templates read."""
    messages = getattr(messages, "messages", messages)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages: expected a list of {{'role': ..., 'content': ...}} dicts, got "
                        f"{type(messages).__name__}")
    if not messages:
        raise ValueError("messages: the conversation is empty; a chat template needs at least one message")
    out = []
    for i, m in enumerate(messages):
        m = _plain(m)
        if not isinstance(m, dict):
            raise TypeError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _read_json(path: Path) -> dict:
    """A JSON object from ``path`` ({} when the file does not exist); damage is refused naming the file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); save the tokenizer again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def special_tokens(folder: str | Path) -> dict[str, str]:
    """The named special tokens (``bos_token``, ``eos_token``, ...) of a tokenizer folder, as
    transformers reads them: from ``tokenizer_config.json``, with a legacy ``special_tokens_map.json``
    taking precedence where the config has no ``added_tokens_decoder`` (transformers reads that file
    only then). Values saved as ``{"content": ...}`` give their content."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    sources = [config]
    if "added_tokens_decoder" not in config:
        sources.append(_read_json(folder / "special_tokens_map.json"))
    out: dict[str, str] = {}
    for data in sources:
        for key, value in data.items():
            if isinstance(value, dict):
                value = value.get("content")
            if key.endswith("_token") and isinstance(value, str):
                out[key] = value
    return out


class ChatTemplate:
    """A checkpoint's chat template(s) and the special tokens they may name.

    ``source`` is the Jinja2 text, or a mapping of named templates (``"default"``, ``"tool_use"``,
    ...) as some checkpoints ship. ``special_tokens`` maps ``bos_token``, ``eos_token``, ... to
    their text; templates see them as variables.
    """

    def __init__(self, source: str | Mapping[str, str], *, special_tokens: Mapping[str, str | None] | None = None):
        if isinstance(source, ChatTemplate):
            special_tokens = source.special_tokens if special_tokens is None else special_tokens
            source = source.sources if source.named else source.source
        if isinstance(source, str):
            sources = {"default": source}
        elif isinstance(source, Mapping) and source and all(isinstance(k, str) and isinstance(v, str)
                                                             for k, v in source.items()):
            sources = dict(source)
        else:
            raise TypeError(f"source: expected the template text or a mapping of names to template texts, got "
                            f"{type(source).__name__}")
        self.sources = sources
        # several templates by name (a dict in transformers, even one holding only "default"), or one
        self.named = not isinstance(source, str)
        self.special_tokens = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}
        for text in sources.values():
            _compile(text)  # syntax errors now, not at the first message

    @property
    def source(self) -> str:
        """The default template's text (with named templates and no ``default``, the first one)."""
        return self.sources["default"] if "default" in self.sources else next(iter(self.sources.values()))

    def __repr__(self) -> str:
        return f"ChatTemplate({sorted(self.sources)}, special_tokens={sorted(self.special_tokens)})"

    # ------------------------------------------------------------------ reading and saving

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate | None:
        """The template of a tokenizer folder as transformers finds it: ``chat_template.jinja`` (and
        named ones in ``additional_chat_templates/``) over ``tokenizer_config.json``'s
        ``chat_template``; special tokens from ``tokenizer_config.json`` and ``special_tokens_map.json``.
        None when the folder has no template."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        specials = {k: v for k, v in special_tokens(folder).items() if k in SPECIAL_TOKENS}
        sources: dict[str, str] = {}
        named = False  # a tokenizer_config list of templates is named even when it holds only "default"
        if (folder / TEMPLATE_FILE).is_file():
            sources["default"] = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        if (folder / TEMPLATE_DIR).is_dir():
            for f in sorted((folder / TEMPLATE_DIR).glob("*.jinja")):
                sources[f.stem] = f.read_text(encoding="utf-8")
        if not sources:
            field = config.get("chat_template")
            if isinstance(field, str):
                sources["default"] = field
            elif isinstance(field, list):
                named = True
                for entry in field:
                    if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                            and isinstance(entry.get("template"), str)):
                        raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template entries must be "  # noqa: TRY004
                                         f"{{'name': ..., 'template': ...}}, got {entry!r}")
                    sources[entry["name"]] = entry["template"]
            elif field is not None:
                raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list "
                                 f"of named templates, got {type(field).__name__}")
        if not sources:
            return None
        single = not named and set(sources) == {"default"}
        return cls(sources["default"] if single else sources, special_tokens=specials)

    def save(self, folder: str | Path) -> None:
        """Write ``chat_template.jinja`` (and named templates under ``additional_chat_templates/``)."""
        folder = Path(folder)
        others = {k: v for k, v in self.sources.items() if k != "default"} if self.named else {}
        for name in others:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
                raise ValueError(f"chat template name {name!r}: use letters, digits, '_', '-' and '.'")
        folder.mkdir(parents=True, exist_ok=True)
        if "default" in self.sources:
            (folder / TEMPLATE_FILE).write_text(self.sources["default"], encoding="utf-8")
        if others:
            (folder / TEMPLATE_DIR).mkdir(exist_ok=True)
            for name, text in others.items():
                (folder / TEMPLATE_DIR / f"{name}.jinja").write_text(text, encoding="utf-8")

    # ------------------------------------------------------------------ rendering

    def _pick(self, name: str | None, tools) -> str:
        """The template to render, as transformers chooses: with one template, ``name`` (when given) is
        itself the template text; with named templates, the one called ``name`` (else ``name`` is the
        text), or by default the ``tool_use`` one when tools are given, else ``default``."""
        if not self.named:
            return self.source if name is None else name
        if name is not None:
            return self.sources.get(name, name)
        if tools is not None and "tool_use" in self.sources:
            return self.sources["tool_use"]
        if "default" in self.sources:
            return self.sources["default"]
        raise ValueError(f"this checkpoint has several chat templates and none is 'default': pass chat_template= "
                         f"one of {sorted(self.sources)}")

    def render(self, messages, *, add_generation_prompt: bool = False, continue_final_message: bool | str = False,
               tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
               chat_template: str | None = None, **variables) -> str | list[str]:
        """The conversation as the model's prompt text, as ``apply_chat_template(..., tokenize=False)``;
        a list of conversations gives a list of texts.

        ``add_generation_prompt`` opens an assistant turn for the model to write;
        ``continue_final_message`` (True, or the field name to continue, e.g. ``"reasoning_content"``)
        leaves the last message open so the model continues it. ``tools`` are JSON schemas,
        ``documents`` dicts with ``title`` and ``text``; other ``variables`` reach the template
        (and win over the special tokens of the same name).
        """
        if _is_batch(messages):
            return [self._render(m, add_generation_prompt, continue_final_message, tools, documents, chat_template,
                                 variables, track=False)[0] for m in messages]
        return self._render(messages, add_generation_prompt, continue_final_message, tools, documents,
                            chat_template, variables, track=False)[0]

    def generation_spans(self, messages, **options) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its ``{% generation %}`` blocks (empty when the
        template has none): what ``return_assistant_tokens_mask`` masks in transformers."""
        return self._render(messages, options.pop("add_generation_prompt", False), False, options.pop("tools", None),
                            options.pop("documents", None), options.pop("chat_template", None), options, track=True)

    def assistant_spans(self, messages, **variables) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and, for each assistant message, the character span of what the
        model writes for it: its content and end-of-turn marker (what training computes a loss on).

        Templates with ``{% generation %}`` blocks give the spans directly. Otherwise the spans come
        from rendering the conversation a turn at a time: assistant turn ``i`` spans from the end of
        ``messages[:i]`` with the generation prompt to the end of ``messages[:i + 1]`` (trailing
        whitespace after the end-of-turn marker left out). A template that does not render the
        conversation as the concatenation of its turns is refused, naming the turn.
        """
        text, spans = self.generation_spans(messages, **variables)
        if spans:
            return text, spans
        msgs = _messages(messages)
        out = []
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            before = self.render(msgs[:i], add_generation_prompt=True, **variables) if i else ""
            through = self.render(msgs[: i + 1], **variables)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(f"messages[{i}]: this chat template does not render the conversation turn by turn "
                                 "(an earlier turn renders differently once later ones follow), so the assistant "
                                 "tokens cannot be found; use a template with {% generation %} blocks")
            end = len(through.rstrip())
            out.append((len(before), max(end, len(before))))
        return text, out

    def _render(self, messages, add_generation_prompt, continue_final_message, tools, documents, name, variables,
                track: bool) -> tuple[str, list[tuple[int, int]]]:
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be set: one opens a new "
                             "assistant turn, the other continues the last message")
        msgs = _messages(messages)
        if tools is not None:
            if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
                raise TypeError(f"tools: expected a list of JSON schemas (dicts), got {type(tools).__name__}")
            for i, t in enumerate(tools):
                if not isinstance(t, Mapping):
                    raise TypeError(f"tools[{i}]: expected a JSON schema dict, got {type(t).__name__}; "
                                    "describe functions as JSON schemas")
        if documents is not None:
            for i, d in enumerate(documents):
                if not isinstance(d, Mapping):
                    raise TypeError(f"documents[{i}]: expected a dict with 'title' and 'text', got "
                                    f"{type(d).__name__}")
        source = self._pick(name, tools)
        continued = None
        if continue_final_message:
            if not msgs:
                raise ValueError("continue_final_message: the conversation is empty")
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            last = msgs[-1]
            if last.get(field) is None:
                raise ValueError(f"continue_final_message: the last message has no {field!r} to continue")
            fields = [f for f in _REASONING if last.get(f) == last[field]] if field in _REASONING else [field]
            if not any(f in source for f in fields):
                raise ValueError(f"continue_final_message={field!r}: this chat template does not read that field")
            if isinstance(last[field], (list, tuple)):
                block = next((b for b in reversed(last[field]) if isinstance(b, dict) and "text" in b), None)
                if block is None:
                    raise ValueError("continue_final_message: the last message has no text block to continue")
                continued = block["text"]
                block["text"] = block["text"] + _CONTINUE
            else:
                continued = last[field]
                for f in fields:
                    last[f] = last[f] + _CONTINUE
        context = {**self.special_tokens, **_plain(dict(variables))}
        context.update(messages=msgs, tools=_plain(list(tools)) if tools is not None else None,
                       documents=_plain(list(documents)) if documents is not None else None,
                       add_generation_prompt=add_generation_prompt)
        template = _compile(source)
        spans: list[tuple[int, int]] = []
        jinja2 = _jinja()
        try:
            if track:
                pieces: list[str] = []
                token = _TRACK.set((pieces, spans))
                try:
                    for piece in template.generate(**context):  # spans read the pieces rendered so far
                        pieces.append(piece)  # noqa: PERF402
                finally:
                    _TRACK.reset(token)
                text = "".join(pieces)
            else:
                text = template.render(**context)
        except jinja2.exceptions.SecurityError as e:
            raise ValueError(f"chat template: refused by the sandbox: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
        if continued is not None:
            tag = _CONTINUE.strip()
            if continued.strip() not in text or tag not in text:
                raise ValueError("continue_final_message: the chat template drops part of the last message, so it "
                                 "cannot be continued")
            at = text.rindex(tag)
            text = text[:at] if text[at: at + len(_CONTINUE)] == _CONTINUE else text[:at].rstrip()
        return text, spans
