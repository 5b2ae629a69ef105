"""Classification (text, image, audio) and transcription routes (being written)."""

from __future__ import annotations


def served(name, model, ctx):
    """The served wrapper for a classifier or speech recognizer, or None for other models."""
    return None


def routes(ctx) -> list:
    return []
