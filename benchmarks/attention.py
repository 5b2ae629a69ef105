"""Attention core vs SDPA and compiled FlexAttention (same as `qkv bench attention`).

    python benchmarks/attention.py [--quick] [--only TEXT]
"""

import sys

from qkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", "--markdown", *sys.argv[1:]]))
