"""Sentence embeddings vs sentence-transformers, greedy decoding vs transformers (same as `qkv bench text`).

    python benchmarks/text.py
"""

import sys

from qkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "text", "--markdown", *sys.argv[1:]]))
