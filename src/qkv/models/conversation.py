"""`Conversation`: multi-turn chat with a causal LM over one KV cache kept between turns.

Each turn renders the whole conversation with the model's chat template (with the generation
prompt), tokenizes it, and keeps the longest common prefix of those ids with the ids whose keys and
values the cache holds: the cache is cut back to that prefix (``cache.length = n``) and only the
rest is prefilled, so turn N costs its new tokens, not the whole history. When re-tokenizing an
earlier reply gives other ids than the ones generated (BPE merges across the turn boundary), the
prefix ends there and the tail is prefilled again: the cache never holds ids the render does not.

Context policy (``max_context``, default the model's ``max_positions``): the prompt plus
``max_new_tokens`` (the room kept for the reply) must fit. When it does not, the oldest whole
turns (a user message and the assistant reply after it) are dropped, the system message kept,
until it fits; the conversation is re-prefilled from where it changed. How many turns were
dropped is logged and reported in `Conversation.last_turn` (``dropped_turns``). A message that
does not fit even alone after the system message is refused with a ``ValueError`` naming the sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from ..nn import KVCache
from .chat import ChatTemplate
from .generation import GenerationConfig, make_generator, next_token
from .streaming import TextStream

log = logging.getLogger(__name__)


def end_of_turn(template: ChatTemplate) -> str | None:
    """The text that closes an assistant turn as ``template`` renders it (ChatML: ``<|im_end|>``),
    found from the span of a probe reply; None when the template writes nothing after the content."""
    probe = "ok"
    text, spans = template.assistant_spans([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    if not spans:
        return None
    span = text[spans[-1][0]: spans[-1][1]]
    at = span.rfind(probe)
    marker = span[at + len(probe):].strip() if at >= 0 else ""
    return marker or None


class Attended(NamedTuple):
    """An earlier token and the attention the last reply gave it."""

    text: str  # the token's text
    score: float  # mean attention probability over the reply's tokens, layers and heads
    position: int  # its position in the conversation's token ids


@dataclass
class TurnStats:
    """What the last `Conversation.send` did, in tokens."""

    prompt: int = 0  # the rendered conversation with the generation prompt
    reused: int = 0  # of those, already in the KV cache
    prefilled: int = 0  # fed to the model before the first new token
    generated: int = 0  # reply tokens (the stop token not counted)
    dropped_turns: int = 0  # oldest user/assistant turns dropped to fit the context


# GenerationConfig fields a conversation sets itself, or that do not apply to one reply at a time
_NOT_OPTIONS = {"max_new_tokens", "eos_token_id", "pad_token_id", "num_beams", "length_penalty", "early_stopping",
                "num_return_sequences"}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Conversation:
    """A chat with ``model`` (a `CausalLM` with a tokenizer that has a chat template, or ``template=``).

    ``send(text)`` streams the reply's text pieces; ``reply(text)`` returns it whole. Generation
    options (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ...) are those of
    `GenerationConfig`; decoding stops at the config's ``eos_token_id``, the tokenizer's end token
    and the template's end-of-turn marker. ``max_new_tokens`` (default 256, or half the context when that
    is less) is the most a reply may be, and the room the context policy keeps for it (module docstring).
    """

    def __init__(self, model, *, system: str | None = None, max_new_tokens: int | None = None,
                 max_context: int | None = None, template: ChatTemplate | None = None, **generation):
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("Conversation needs a model with a tokenizer: load it with qkv.load(folder) from a "
                             "folder holding tokenizer.json")
        if not getattr(model, "continues_prompt", False) or not hasattr(model.config, "max_positions"):
            raise ValueError(f"Conversation needs a causal language model (CausalLM), got {type(model).__name__}")
        self.template = template if template is not None else getattr(tok, "chat_template", None)
        if self.template is None:
            raise ValueError("the model's tokenizer has no chat template (no chat_template.jinja, no chat_template in "
                             "tokenizer_config.json): pass template=ChatTemplate(text) (qkv chat: --template FILE)")
        self.model, self.tokenizer, self.system = model, tok, system
        limit = model.config.max_positions
        self.max_context = limit if max_context is None else max_context
        if isinstance(self.max_context, bool) or not isinstance(self.max_context, int) or self.max_context < 2:
            raise ValueError(f"max_context must be an int >= 2, got {self.max_context!r}")
        if model.config.positions == "learned" and self.max_context > limit:
            raise ValueError(f"max_context={self.max_context} is longer than the model's {limit} learned positions; "
                             f"give at most {limit}")
        known = {f.name for f in fields(GenerationConfig)} - _NOT_OPTIONS
        unknown = sorted(set(generation) - known)
        if unknown:
            raise TypeError(f"Conversation: unknown generation option {unknown[0]!r}; known: {sorted(known)}")
        marker = end_of_turn(self.template)
        stops = list(GenerationConfig(eos_token_id=model.config.eos_token_id).stop_ids)
        for text in (tok.eos_token, marker):
            ids = tok.encode(text, add_special_tokens=False) if text else []
            if len(ids) == 1 and ids[0] not in stops:
                stops.append(ids[0])
        self._stop_texts = [marker] if marker and len(tok.encode(marker, add_special_tokens=False)) > 1 else []
        if max_new_tokens is None:
            max_new_tokens = min(256, self.max_context // 2)
        self.gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops, **generation)
        if self.gen.max_new_tokens >= self.max_context:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a {self.max_context}-token "
                             "context; lower max_new_tokens or raise max_context")
        self._generator = make_generator(self.gen, model.device)
        self.cache = KVCache(model.config.n_layers, capacity=self.max_context)
        self.ids: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.forwarded = 0  # tokens passed to the model so far (prefill and decoding)
        self.last_turn = TurnStats()
        self.reset()

    # ------------------------------------------------------------------ conversation state

    def reset(self) -> None:
        """Forget every turn; the system message stays (and its tokens stay cached)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._last: tuple[list[int], list[int]] | None = None  # (prompt ids, reply ids) of the last reply
        self._turn = getattr(self, "_turn", 0) + 1  # a send() still streaming is stale from now on

    def _encode(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template writes the special tokens

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int], int]:
        """``messages`` (ending with the new user message) cut to fit the context: (messages, ids, turns dropped)."""
        room = self.max_context - self.gen.max_new_tokens
        first = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            ids = self._encode(messages)
            if len(ids) <= room:
                return messages, ids, dropped
            if len(messages) - first <= 1:
                alone = len(self.tokenizer.encode(messages[-1]["content"], add_special_tokens=False))
                raise ValueError(f"the message is {alone} tokens and the prompt with it {len(ids)} tokens"
                                 f"{' (with the system message)' if first else ''}, more than the {room} that fit: "
                                 f"a {self.max_context}-token context keeps {self.gen.max_new_tokens} for the reply "
                                 "(max_new_tokens); shorten the message, lower max_new_tokens or raise max_context")
            step = 2 if len(messages) - first > 2 and messages[first + 1]["role"] == "assistant" else 1
            messages = messages[:first] + messages[first + step:]
            dropped += 1

    # ------------------------------------------------------------------ model calls

    @torch.no_grad()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` after the cached tokens; returns the logits (1, V) of the last one."""
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        out = self.model(x, None, None, cache=self.cache, last_only=True)
        self.ids.extend(ids)
        self.forwarded += len(ids)
        return out.logits[:, -1]

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        keep = _common_prefix(self.ids, ids)
        if self.model.config.token_conv and keep < len(self.ids):
            keep = 0  # the convolution's carried state is that of the last cached token: no cutting back
        keep = min(keep, len(ids) - 1)  # at least one token to forward, for the next token's logits
        self.cache.length = keep
        del self.ids[keep:]
        self.last_turn.reused, self.last_turn.prefilled = keep, len(ids) - keep
        return self._forward(ids[keep:])

    def _next(self, logits: torch.Tensor, first: bool) -> int:
        history = torch.tensor([self.ids], dtype=torch.long, device=logits.device)
        return int(next_token(logits, self.gen, self._generator, first=first, history=history,
                              prompt_len=self.last_turn.prompt)[0])

    # ------------------------------------------------------------------ public API

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to the user message ``text`` as text pieces; when the stream ends the message and
        the reply join `messages`. The prompt is built (and refused when it cannot fit) before this returns."""
        if not isinstance(text, str):
            raise TypeError(f"send: expected the user's message as a str, got {type(text).__name__}")
        messages, ids, dropped = self._fit([*self.messages, {"role": "user", "content": text}])
        if dropped:
            log.info("context full (%d tokens, %d kept for the reply): dropped the oldest %d turn(s)",
                     self.max_context, self.gen.max_new_tokens, dropped)
        self._turn += 1
        return self._stream(messages, ids, dropped, self._turn)

    def _stream(self, messages: list[dict], ids: list[int], dropped: int, turn: int) -> Iterator[str]:
        self.last_turn = TurnStats(prompt=len(ids), dropped_turns=dropped)
        logits = self._prefill(ids)
        stream = TextStream(self.tokenizer, stop=(*self.gen.stop, *self._stop_texts))
        stops = set(self.gen.stop_ids)
        n = min(self.gen.max_new_tokens, self.max_context - len(ids))
        reply: list[int] = []
        pieces: list[str] = []
        for i in range(n):
            if turn != self._turn:
                raise RuntimeError("this reply's stream is stale: the conversation was reset or sent another message")
            token = self._next(logits, first=i == 0)
            if token in stops:
                break
            reply.append(token)
            piece = stream.push(token)
            if piece:
                pieces.append(piece)
                yield piece
            if stream.stopped:  # a stop string
                break
            if i + 1 < n:
                logits = self._forward([token])
        tail = stream.flush()
        if tail:
            pieces.append(tail)
            yield tail
        self.last_turn.generated = len(reply)
        self.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]
        self._last = (ids, reply)

    def reply(self, text: str) -> str:
        """The whole reply to ``text`` (see `send`)."""
        return "".join(self.send(text))

    @torch.no_grad()
    def attention_of_last_reply(self, top: int = 10) -> list[Attended]:
        """The ``top`` earlier tokens (before the reply) the last reply attended to most: the exact attention
        probabilities of the queries that chose each reply token, averaged over those queries, the layers and
        the heads (a re-run of the final sequence with ``return_weights``). Largest first."""
        if self._last is None:
            raise ValueError("no reply yet: call send() or reply() first")
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be an int >= 1, got {top!r}")
        prompt, reply = self._last
        if not reply:
            return []
        seq = prompt + reply
        s = len(prompt)
        cache = KVCache(self.model.config.n_layers, capacity=len(seq))
        device = self.model.device
        if s > 1:
            self.model(torch.tensor([seq[: s - 1]], device=device), cache=cache, last_only=True)
        # query s-1+j chose reply token j: rows s-1 .. s+R-2
        out = self.model(torch.tensor([seq[s - 1: s - 1 + len(reply)]], device=device), cache=cache,
                         return_weights=True, last_only=True)
        weights = torch.stack([w[0].float().mean(0) for w in out.attentions])  # (L, R, Tk), heads averaged
        scores = weights.mean((0, 1))[:s]  # (s,): keys before the reply
        values, index = scores.topk(min(top, s))
        texts = self.tokenizer.token_texts([seq[int(i)] for i in index])
        return [Attended(t, float(v), int(i)) for t, v, i in zip(texts, values, index)]

