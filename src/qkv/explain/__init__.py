"""Explanations: see where every position looked, for text, images and audio, at any length.

>>> import qkv
>>> model = qkv.load("all-MiniLM-L6-v2")
>>> ex = qkv.explain.explain_text(model, "The bank of the river was muddy.")
>>> qkv.explain.terminal(ex, token="bank")          # the "light bulbs"
>>> qkv.explain.render_html(ex, "bank.html")        # one self-contained page

`capture` reads the exact attention of any qkv model without changing the
backend that runs it: full matrices for short inputs, top-k keys per query
(and head averages for rollout) for long ones.
"""

from .aggregate import entropy, gradient_attention, head_stats, mean_distance, rollout
from .capture import AttentionMaps, Capture, capture
from .core import Explanation, explain_audio, explain_image, explain_text, explain_texts
from .render import find_token, png, terminal
from .render_html import render_html, safe_json

__all__ = ["capture", "Capture", "AttentionMaps", "Explanation", "explain_text", "explain_texts", "explain_image",
           "explain_audio", "rollout", "entropy", "mean_distance", "head_stats", "gradient_attention", "terminal",
           "png", "render_html", "safe_json", "find_token"]
