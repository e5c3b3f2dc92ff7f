"""Batches packed for the device: one contiguous tensor per dtype instead of a dict of many
small tensors, so a batch reaches the GPU in two copies.

`Preprocessor.transform` gives a dict of arrays (`categorical`, `dense`, `multi_hot.<c>`,
`labels`, `mask`, `weight`, `group.<c>`). `Layout.pack` lays them side by side in a float32
block (dense, labels, mask, weight) and an int64 block (categorical, multi-hot ids, group
keys); `Layout.unpack` gives the named tensors back as views of the blocks. `Prefetcher`
copies the next packed batch to the GPU on a side stream while the current one trains.
Pure numpy and torch: no Ray (`pipeline.data.ingest` hands Ray Data's batches to `pack`).

Example:
    >>> arrays = {"dense": np.ones((2, 3), np.float32), "labels": np.zeros((2, 1), np.float32),
    ...           "categorical": np.arange(4).reshape(2, 2), "weight": np.ones(2, np.float32)}
    >>> layout = Layout.of(arrays)
    >>> packed = layout.pack(arrays)
    >>> {k: tuple(v.shape) for k, v in packed.items()}
    {'float32': (2, 5), 'int64': (2, 2)}
    >>> layout.unpack(packed)["categorical"].tolist()
    [[0, 1], [2, 3]]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

FLOAT, INT = "float32", "int64"
_DTYPES = {FLOAT: (np.float32, torch.float32), INT: (np.int64, torch.int64)}

Packed = dict[str, torch.Tensor]  # {"float32": [B, F], "int64": [B, I]}


@dataclass(frozen=True)
class Layout:
    """Where each named array sits in the packed blocks: per block, (name, width) in order;
    width 0 is a 1-D array (one column)."""

    blocks: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        """The layout of a batch of `transform`'s output (names in sorted order per dtype)."""
        blocks = []
        for block, (np_dtype, _) in _DTYPES.items():
            names = sorted(k for k, v in arrays.items() if v.dtype == np_dtype)
            widths = tuple((k, arrays[k].shape[1] if arrays[k].ndim == 2 else 0) for k in names)
            blocks.append((block, widths))
        unpacked = set(arrays) - {k for _, ws in blocks for k, _ in ws}
        if unpacked:
            raise ValueError(f"collate: arrays {sorted(unpacked)} are neither float32 nor int64")
        return cls(tuple(blocks))

    def pack(self, arrays: Mapping[str, np.ndarray], pin: bool = False) -> Packed:
        """The arrays laid side by side, one contiguous tensor per block; with `pin`, written
        straight into page-locked memory (one copy, ready for an asynchronous transfer)."""
        rows = len(next(iter(arrays.values())))
        out = {}
        for block, widths in self.blocks:
            torch_dtype = _DTYPES[block][1]
            width = sum(max(w, 1) for _, w in widths)
            target = torch.empty((rows, width), dtype=torch_dtype, pin_memory=pin)
            if widths:
                columns = [arrays[k].reshape(rows, max(w, 1)) for k, w in widths]
                np.concatenate(columns, axis=1, out=target.numpy(), casting="same_kind")
            out[block] = target
        return out

    def row_bytes(self) -> int:
        """The bytes one packed row takes."""
        return sum(
            sum(max(w, 1) for _, w in widths) * np.dtype(_DTYPES[block][0]).itemsize
            for block, widths in self.blocks
        )

    def unpack(self, packed: Packed) -> dict[str, torch.Tensor]:
        """The named tensors, as views of the blocks."""
        out = {}
        for block, widths in self.blocks:
            start = 0
            for name, width in widths:
                span = max(width, 1)
                view = packed[block][:, start : start + span]
                out[name] = view if width else view[:, 0]
                start += span
        return out


def rows_of(packed: Packed) -> int:
    """The number of rows of a packed batch."""
    return next(iter(packed.values())).shape[0]


def pad(batch: Mapping[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """`batch` (named or packed) grown to `rows` rows with zeros: padding rows have weight 0
    and mask 0 (and ids 0), so they count in no loss, gradient or metric."""
    have = next(iter(batch.values())).shape[0]
    if have == rows:
        return dict(batch)
    if have > rows:
        raise ValueError(f"pad: a batch of {have} rows is larger than {rows}")
    return {k: torch.cat([v, v.new_zeros((rows - have, *v.shape[1:]))]) for k, v in batch.items()}


class Prefetcher:
    """Packed batches moved to `device` one batch ahead: while the step runs on batch i, a
    side stream copies batch i + 1 from pinned host memory (`non_blocking`). On a CPU device
    the batches pass through.

    Args:
        batches: packed batches on the host (pinned for an asynchronous copy).
        device: where the step runs.
    """

    def __init__(self, batches: Iterable[Packed], device: torch.device) -> None:
        self.batches = iter(batches)
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None

    def _start(self) -> tuple[Packed, object] | None:
        batch = next(self.batches, None)
        if batch is None or self.stream is None:
            return (batch, None) if batch is not None else None
        with torch.cuda.stream(self.stream):
            moved = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return moved, ready

    def __iter__(self) -> Iterator[Packed]:
        pending = self._start()
        while pending is not None:
            batch, ready = pending
            if ready is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(ready)
                for tensor in batch.values():  # its memory is the step's stream's now
                    tensor.record_stream(current)
            pending = self._start()  # the next copy overlaps this batch's step
            yield batch
