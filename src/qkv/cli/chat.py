"""`qkv chat`: a multi-turn conversation with a chat model, one user message per stdin line.

The reply streams as it is generated; the KV cache is kept between turns (each turn prefills only
its new tokens). ``/reset`` clears the conversation (the system message stays), ``/exit`` or the
end of input quits. Works in a terminal (a ``you>`` prompt on stderr) and piped (no prompt).
With ``--json``: one JSON object per turn on stdout, nothing streamed.
"""

from __future__ import annotations

import json
import sys


from ._args import input_file, load_model, report

COMMANDS = ("/reset", "/exit")


def _template(args, tokenizer):
    """The chat template: ``--template FILE``, else the tokenizer's own; refused with the fix when there is none."""
    from ..models.chat import ChatTemplate

    if args.template:
        path = input_file(args.template, "--template")
        return ChatTemplate(path.read_text(encoding="utf-8"), special_tokens=tokenizer.special_texts())
    if tokenizer.chat_template is None:
        raise ValueError(f"{args.model} has no chat template (no chat_template.jinja, no chat_template in "
                         "tokenizer_config.json), so its turns cannot be rendered: give one with --template FILE "
                         "(a Jinja chat template, e.g. ChatML)")
    return tokenizer.chat_template


def conversation(args):
    """The `Conversation` the command line asks for."""
    from ..models.conversation import Conversation

    model = load_model(args, args.model)
    if not getattr(model, "continues_prompt", False):
        raise ValueError(f"{args.model} is a {type(model).__name__}; qkv chat needs a causal language model "
                         "(a GPT-2 / Llama style folder, or a qkv train output of task \"lm\" or \"chat\")")
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json): qkv chat reads and writes text; put the "
                         "model's tokenizer.json (and tokenizer_config.json) in the folder")
    sample = args.sample or args.temperature != 1.0 or args.top_p is not None
    options = {"do_sample": sample, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    return Conversation(model, system=args.system, max_new_tokens=args.max_new_tokens,
                        max_context=args.max_context, template=_template(args, model.tokenizer), **options)


def _safe(text: str) -> str:
    from ..explain.tokens import terminal_safe

    return terminal_safe(text)


def _explain_lines(attended) -> list[str]:
    from ..explain.tokens import shown

    lines = ["attended to most (mean attention over the reply's tokens, layers and heads):"]
    lines += [f"  {a.score:.4f}  {_safe(shown(a.text))}  (position {a.position})" for a in attended]
    return lines


def _turn_json(conv, text: str, reply: str, explain: int) -> dict:
    t = conv.last_turn
    row = {"user": text, "reply": reply, "prompt_tokens": t.prompt, "reused_tokens": t.reused,
           "prefilled_tokens": t.prefilled, "generated_tokens": t.generated, "dropped_turns": t.dropped_turns}
    if explain:
        row["attention"] = [{"token": a.text, "score": round(a.score, 6), "position": a.position}
                            for a in conv.attention_of_last_reply(top=explain)]
    return row


def run(args) -> int:
    """Read user lines from stdin until ``/exit`` or the end of input; 2 when a message was refused, else 0."""
    conv = conversation(args)
    interactive = sys.stdin.isatty()
    explain = args.explain or 0  # how many tokens --explain lists
    status = 0
    if interactive:
        print("qkv chat: /reset clears the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            if interactive:
                print(file=sys.stderr)  # Ctrl-D: end the prompt's line
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            conv.reset()
            if not args.json:
                print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        try:
            stream = conv.send(text)
        except ValueError as e:  # a message that cannot fit: say so, keep the conversation going
            report("chat", e, args.json)
            status = 2
            continue
        if args.json:
            print(json.dumps(_turn_json(conv, text, "".join(stream), explain)), flush=True)
            continue
        try:
            for piece in stream:
                sys.stdout.write(_safe(piece))
                sys.stdout.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(reply interrupted)", file=sys.stderr)
            continue
        print(flush=True)
        if conv.last_turn.dropped_turns:
            print(f"(context full: dropped the oldest {conv.last_turn.dropped_turns} turn(s))", file=sys.stderr)
        if explain:
            print("\n".join(_explain_lines(conv.attention_of_last_reply(top=explain))), flush=True)
    return status
