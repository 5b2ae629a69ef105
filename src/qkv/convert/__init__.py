"""Checkpoint converters: pure ``state_dict -> state_dict`` functions, one module per source format.

`qkv.models` never imports this package; `qkv.pretrained.load` does.
"""

from . import ctranslate2, huggingface
from ._keymap import ConversionError, KeyMap, check_complete, find_prefix

__all__ = ["huggingface", "ctranslate2", "ConversionError", "KeyMap", "check_complete", "find_prefix"]
