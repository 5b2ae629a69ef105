"""Generated tasks (never downloaded): LRA ListOps, Zoology's multi-query associative recall, string reversal."""

from __future__ import annotations

import random

import torch

from .core import IGNORE

LISTOPS_TOKENS = ["<pad>", "<cls>", "[MIN", "[MAX", "[MED", "[SM", "]"] + [str(d) for d in range(10)]
_OPS = ["[MIN", "[MAX", "[MED", "[SM"]


def _listops_tree(rng: random.Random, budget: int, depth: int, max_depth: int, max_args: int):
    """A random expression of about ``budget`` tokens (an operator and its "]" cost two)."""
    if budget < 4 or depth >= max_depth:
        return rng.randrange(10)
    n_args = rng.randint(2, max_args)
    inner = budget - 2
    cuts = sorted(rng.randint(0, inner) for _ in range(n_args - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, inner])]
    return (rng.choice(_OPS), [_listops_tree(rng, max(1, s), depth + 1, max_depth, max_args) for s in sizes])


def _listops_value(node) -> int:
    if isinstance(node, int):
        return node
    op, args = node
    vals = sorted(_listops_value(a) for a in args)
    if op == "[MIN":
        return vals[0]
    if op == "[MAX":
        return vals[-1]
    if op == "[MED":
        return vals[len(vals) // 2]
    return sum(vals) % 10


def _listops_tokens(node, out: list[str]) -> list[str]:
    if isinstance(node, int):
        out.append(str(node))
    else:
        op, args = node
        out.append(op)
        for a in args:
            _listops_tokens(a, out)
        out.append("]")
    return out


def listops(n: int, min_len: int = 500, max_len: int = 2000, max_depth: int = 10, max_args: int = 10,
            seed: int = 0) -> dict[str, torch.Tensor]:
    """ListOps (Nangia and Bowman, 2018; the Long Range Arena version, arXiv:2011.04006): nested MIN, MAX,
    MED(ian) and SM (sum mod 10) over digits; the label is the value, 0-9. Lengths in [min_len, max_len]."""
    rng = random.Random(seed)
    vocab = {t: i for i, t in enumerate(LISTOPS_TOKENS)}
    seqs, labels = [], []
    while len(seqs) < n:
        tree = _listops_tree(rng, rng.randint(min_len, max_len), 0, max_depth, max_args)
        if isinstance(tree, int):
            continue
        toks = _listops_tokens(tree, [])
        if not min_len <= len(toks) + 1 <= max_len:
            continue
        seqs.append([vocab["<cls>"]] + [vocab[t] for t in toks])
        labels.append(_listops_value(tree))
    width = max(len(s) for s in seqs)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def mqar(n: int, seq_len: int = 256, pairs: int = 16, vocab_size: int = 8192, seed: int = 0,
         power: float = 0.01, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Multi-query associative recall (Arora et al., Zoology, arXiv:2312.04927).

    The sequence opens with ``pairs`` key-value pairs (keys from the lower half of the
    vocabulary, values from the upper); each key is queried once later, at a distance
    drawn from a power law. The label at a query position is its value (-100 elsewhere):
    the model must recall it. Token 0 fills the gaps.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    ctx = 2 * pairs
    if seq_len < ctx + pairs:
        raise ValueError(f"seq_len={seq_len} cannot hold {pairs} pairs and their queries")
    keys = torch.rand(n, half - 1, generator=g).argsort(dim=1)[:, :pairs] + 1  # (n, pairs) distinct, never 0
    values = torch.randint(half, vocab_size, (n, pairs), generator=g)
    ids = torch.zeros(n, seq_len, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    ids[:, 0:ctx:2], ids[:, 1:ctx:2] = keys, values
    gaps = seq_len - ctx
    weights = (torch.arange(1, gaps + 1, dtype=torch.float64) ** -power).expand(n, gaps)
    slots = torch.multinomial(weights, pairs, replacement=False, generator=g) + ctx  # (n, pairs)
    order = torch.rand(n, pairs, generator=g).argsort(dim=1)
    ids.scatter_(1, slots, keys.gather(1, order))
    labels.scatter_(1, slots, values.gather(1, order))
    return {"input_ids": ids, "labels": labels}


def reverse_strings(n: int, min_len: int = 3, max_len: int = 12, seed: int = 0) -> list[dict]:
    """Source: random lower-case letters; target: the same letters reversed (a seq2seq sanity task)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for _ in range(n):
        s = "".join(rng.choice(letters) for _ in range(rng.randint(min_len, max_len)))
        out.append({"source": " ".join(s), "target": " ".join(reversed(s))})
    return out
