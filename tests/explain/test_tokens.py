"""Every token visible and harmless: stand-ins for whitespace, controls and invisible code points, in every view."""

import io
import re
import unicodedata

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
import qkv.explain as X
from qkv.explain.tokens import pieces, shown, terminal_safe

HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Co", "Cn", "Cs"}


@given(st.text(max_size=12))
def test_shown_form_is_never_empty_or_invisible_and_keeps_ordinary_text(text):
    s = shown(text)
    assert s and s.strip()
    assert not any(unicodedata.category(c) in HIDDEN for c in s)
    plain = "".join(p for p, stand_in in pieces(text) if not stand_in)
    assert all(c in text for c in plain)  # ordinary text is shown as it is, never altered
    if text.isprintable() and text.strip() and not all(unicodedata.category(c).startswith("M") for c in text):
        assert s == text


@pytest.mark.parametrize("token, want", [("\n", "⏎"), ("\t", "⇥"), ("  ", "··"), ("\r\n", "⟨CR⟩⏎"), ("", "∅"),
                                         ("\u2028", "⟨U+2028⟩"), ("a\u202eb", "a⟨U+202E⟩b"), ("\x1b[2J", "⟨ESC⟩[2J"),
                                         ("\u00a0", "⟨U+00A0⟩"), ("\u0301", "◌\u0301"), (" the", " the")])
def test_stand_ins(token, want):
    assert shown(token) == want
    assert [stand_in for _, stand_in in pieces(token)] != [False] or token == want


def test_terminal_safe_keeps_lines_and_emoji_but_not_escapes():
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    assert terminal_safe(f"one\n\ttwo {family}") == f"one\n\ttwo {family}"
    out = terminal_safe("a\x1b]52;c;ZXZpbA==\x07b\x9b31m\u202ec")
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out and "\u202e" not in out
    assert out.startswith("a⟨ESC⟩]52;c;ZXZpbA==⟨BEL⟩b")


def _maps_explanation(tokens):
    T = len(tokens)
    maps = X.AttentionMaps("layers.0.attn", 0, "self", [0, 1], T, T)
    maps.dense = torch.softmax(torch.randn(2, T, T, generator=torch.Generator().manual_seed(0)), -1)
    maps.mean = maps.dense.mean(0)
    return X.Explanation("text", tokens, [maps], X.rollout([maps.mean]), model="m\x1b[2J", n_heads=2)


def test_terminal_prints_markup_and_escapes_as_plain_visible_text():
    from rich.console import Console

    tokens = ["[CLS]", "[/quote]", "[bold red]x[/]", ":smile:", "\x1b]8;;http://evil\x07link", "\x1b[2J", "\n",
              "\u202e", "[SEP]"]
    ex = _maps_explanation(tokens)
    buf, colour = io.StringIO(), io.StringIO()
    X.terminal(ex, token=1, console=Console(file=buf, width=200, color_system=None))
    X.terminal(ex, token=1, console=Console(file=colour, width=200, color_system="truecolor"))
    out = buf.getvalue()
    for t in ["[/quote]", "[bold red]x[/]", ":smile:"]:
        assert t in out  # literally, not as markup or emoji codes
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out  # no OSC link, clear screen, bidi
    assert "⟨ESC⟩]8;;http://evil⟨BEL⟩link" in out and "⟨ESC⟩[2J" in out and "⏎" in out and "⟨U+202E⟩" in out
    assert re.sub(r"\x1b\[[0-9;]*m", "", colour.getvalue()) == out  # colour adds styles (SGR) only


def test_png_labels_with_dollars_and_controls(tmp_path):
    ex = _maps_explanation(["$", "$x^2$", "\n", "\x00", "a"])
    out = X.png(ex, tmp_path / "a.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gpt_folder(tmp_path_factory):
    from hf_models import tiny_gpt_folder

    return tiny_gpt_folder(tmp_path_factory.mktemp("tiny-gpt-tokens"))


def test_byte_level_tokens_are_found_and_shown_by_their_text(gpt_folder):
    model = qkv.load(gpt_folder)
    ex = X.explain_text(model, "the river bank was muddy")
    assert any(t.startswith("\u0120") for t in ex.tokens)  # byte-level pieces, as the tokenizer writes them
    i = X.find_token(ex, "BANK")
    assert ex.text(i).strip().lower() == "bank" and ex.tokens[i].startswith("\u0120")
    shown_all = [shown(ex.text(j)) for j in range(ex.length)]
    assert not any("\u0120" in s for s in shown_all) and " bank" in shown_all
    assert X.render_html(ex).count("\\u0120") + X.render_html(ex).count("\u0120") > 0  # true tokens travel


def test_layers_and_heads_out_of_range_are_refused_by_name():
    ex = _maps_explanation(["a", "b", "c"])
    for bad in (1, 99, -2):
        with pytest.raises(ValueError, match=f"layer={bad}"):
            ex.row(0, bad, None)
    with pytest.raises(ValueError, match="head=5"):
        ex.row(0, 0, 5)
    with pytest.raises(ValueError, match="layer=99"):
        X.terminal(ex, token=0, layer=99, console=None)
    torch.testing.assert_close(ex.row(0, -1, -1), ex.row(0, 0, 1))  # negative: from the end
