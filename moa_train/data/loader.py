"""The loader: prepared tokens served as one array (TokenShards), packed training batches, validation batches.

Nothing here reads the cache's files or meta.json (cache.py does): it takes token arrays, so the
samples of a run depend only on (tokens, seq_len, seed), never on the shard size.
"""

from __future__ import annotations

import numpy as np
import torch


class TokenShards:
    """Several token files read as one 1-D array: len() and slices that may span shard boundaries."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("TokenShards supports contiguous slices only")
        start, stop, step = index.indices(len(self))
        assert step == 1, "TokenShards supports contiguous slices only"
        parts, shard = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            base = self.offsets[shard]
            piece = self.shards[shard][start - base:min(stop, self.offsets[shard + 1]) - base]
            parts.append(piece)
            start += len(piece)
            shard += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.shards)
        return whole if dtype is None else whole.astype(dtype)


# ----------------------------------------------------------------------------- batches


class PackedBatches:
    """Windows of seq_len + 1 tokens at stride seq_len, visited in a seeded random order per epoch.

    Sample k of the run is window perm_{k // n}[k % n]: a pure function of (seed, k), so the data
    position of a run is just the number of samples it has consumed (a resumed run recreates this
    object and asks for sample step * batch_size onward). `tokens` is one array or TokenShards:
    windows are laid over the concatenation, so the shard size never changes the samples.
    """

    def __init__(self, tokens: np.ndarray | TokenShards, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_windows, generator=generator)}
        return self._perms[epoch]

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of samples first .. first + count - 1."""
        k = np.arange(first, first + count)
        epochs = k // self.n_windows
        windows = np.concatenate([self._perm(int(e)).numpy()[k[epochs == e] % self.n_windows]
                                  for e in np.unique(epochs)])  # k is sorted, so epochs come in order
        return windows * self.seq_len

    def samples(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.window_starts(first, count)
        if isinstance(self.tokens, np.ndarray):  # one gather from the memory map
            chunk = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        else:
            chunk = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])
        chunk = torch.from_numpy(chunk.astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


def validation_batches(tokens: np.ndarray, seq_len: int, eval_tokens: int, batch_size: int, rank: int = 0,
                       world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's share of the fixed validation set, as (inputs, targets, weight) batches.

    The set is the first eval_tokens // seq_len windows. Rank r of W takes a contiguous share of
    ceil(n / W) windows; a short last share is padded with copies of window 0 of weight 0, so
    every rank runs the same number of forward passes of the same shapes.
    """
    n = eval_tokens // seq_len
    chunk = torch.from_numpy(np.asarray(tokens[: n * seq_len + 1]).astype(np.int64))
    x, y = chunk[:-1].view(n, seq_len), chunk[1:].view(n, seq_len)
    share = -(-n // world_size)
    index = torch.arange(rank * share, (rank + 1) * share)
    weight = (index < n).float()
    index = torch.where(index < n, index, 0)
    x, y = x[index], y[index]
    return [(x[i:i + batch_size], y[i:i + batch_size], weight[i:i + batch_size]) for i in range(0, share, batch_size)]
