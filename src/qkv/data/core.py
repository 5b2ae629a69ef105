"""`Data`: the splits of a training set as in-memory tensors, and deterministic batching."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..pretrained.tokenizer import Tokenizer

IGNORE = -100  # label value the loss skips


class DataError(ValueError):
    """A problem with the user's data, naming the file and line where it applies."""


@dataclass
class Data:
    """Train / val / test splits.

    ``kind="stream"``: each split is one long (N,) token tensor (language modelling
    samples windows of ``block_size + 1``). ``kind="table"``: each split is a dict
    of tensors sharing their first dimension (one row per example).
    """

    kind: str
    splits: dict[str, object]
    tokenizer: Tokenizer | None = None
    labels: list[str] | None = None
    info: dict = field(default_factory=dict)
    # generated tasks: fresh training examples for every batch, ``fresh(batch_size, generator) -> rows``
    # (nothing to memorise); validation and test stay fixed
    fresh: Callable[[int, torch.Generator], dict] | None = None

    def size(self, split: str) -> int:
        s = self.splits[split]
        return int(s.numel()) if self.kind == "stream" else int(next(iter(s.values())).shape[0])

    def sample(self, split: str, batch_size: int, generator: torch.Generator, block_size: int = 0) -> dict:
        """A random batch: ``batch_size`` windows (stream) or rows (table), drawn with ``generator``."""
        if self.kind == "stream":
            tokens = self.splits[split]
            if tokens.numel() <= block_size + 1:
                raise DataError(f"the {split} split has {tokens.numel()} tokens; block_size={block_size} needs more")
            starts = torch.randint(0, tokens.numel() - block_size - 1, (batch_size,), generator=generator)
            return _windows(tokens, starts, block_size)
        if split == "train" and self.fresh is not None:
            return self.fresh(batch_size, generator)
        idx = torch.randint(0, self.size(split), (batch_size,), generator=generator)
        return self.rows(split, idx)

    def rows(self, split: str, idx: torch.Tensor) -> dict:
        return {k: v[idx] for k, v in self.splits[split].items()}

    def batches(self, split: str, batch_size: int, block_size: int = 0, limit: int = 0) -> Iterator[dict]:
        """The split in order (deterministic evaluation). With ``limit`` > 0, at most that many batches;
        for token streams they are spread evenly over the split, so a partial evaluation is unbiased."""
        n = 0
        if self.kind == "stream":
            tokens = self.splits[split]
            last = tokens.numel() - block_size - 1
            starts = list(range(0, max(last, 0), block_size))
            if limit and len(starts) > limit * batch_size:
                stride = len(starts) / (limit * batch_size)
                starts = [starts[int(i * stride)] for i in range(limit * batch_size)]
            for s in range(0, len(starts), batch_size):
                yield _windows(tokens, torch.tensor(starts[s : s + batch_size]), block_size)
            return
        size = self.size(split)
        for s in range(0, size, batch_size):
            yield self.rows(split, torch.arange(s, min(s + batch_size, size)))
            n += 1
            if limit and n >= limit:
                return


def _windows(tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> dict:
    """Inputs and next-token labels of the windows ``tokens[s : s + block_size + 1]`` for each start."""
    win = tokens[starts[:, None] + torch.arange(block_size + 1)]
    return {"input_ids": win[:, :-1], "labels": win[:, 1:]}


def split_rows(table: dict[str, torch.Tensor], val: float, test: float, seed: int) -> dict[str, dict]:
    """Shuffle rows (seeded) and cut train / val / test."""
    n = int(next(iter(table.values())).shape[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = int(round(n * test)), int(round(n * val))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {name: {k: v[idx] for k, v in table.items()} for name, idx in parts.items()}
