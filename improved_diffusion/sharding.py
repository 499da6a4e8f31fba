"""
Work split over the ranks of a sampling or evaluation run, and the results
gathered on rank 0: each rank takes a contiguous block of item indices, in
batches; rank 0 collects every round of batches into arrays on disk, so it
never holds more than one batch per rank in memory.
"""

import contextlib
import os
import sys
import tempfile

import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from . import dist_util, logger
from .io_util import is_local


def rank_indices(num_items, rank, world_size):
    """The contiguous block of item indices that `rank` handles (a range; blocks differ by at most 1)."""
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


def chunks(indices, size):
    """Consecutive slices of `indices` of at most `size` items."""
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def sample_in_shards(num_samples, batch_size, draw_batch, spool_dir, desc="sampling"):
    """
    Draw `num_samples` samples split over the ranks and collect them on rank 0
    as they come, one round of batches at a time, in arrays on disk: rank 0
    never holds more than one batch per rank in memory.

    :param draw_batch: function(indices) -> dict of NumPy arrays whose first
        axis has len(indices) rows, for those global sample indices.
    :param spool_dir: a local folder on rank 0 for the arrays (ignored elsewhere).
    :return: on rank 0, dict of memory-mapped arrays with num_samples rows in
        index order (valid while spool_dir exists); None on the other ranks.
    """
    rank, world_size = dist_util.get_rank(), dist_util.get_world_size()
    batches = [chunks(rank_indices(num_samples, r, world_size), batch_size) for r in range(world_size)]
    spool = SampleSpool(num_samples, spool_dir) if rank == 0 else None
    if world_size > 1:
        desc = f"{desc} (rank 0 of {world_size})"
    total = sum(map(len, batches[rank]))
    with tqdm(total=total, desc=desc, unit="sample", disable=rank != 0, file=sys.stderr) as bar:
        for round_index in range(max(map(len, batches))):
            mine = batches[rank][round_index] if round_index < len(batches[rank]) else None
            part = None if mine is None else (mine, draw_batch(mine))
            for indices, arrays in _gather_round(part):
                spool.put(indices, arrays)
            bar.update(0 if mine is None else len(mine))
    return None if spool is None else spool.arrays


def _gather_round(part):
    """Every rank's (indices, arrays) of this round (None: no batch), as a list on rank 0; [] elsewhere."""
    return [p for p in gather_lists([part]) or [] if p is not None]


class SampleSpool:
    """Arrays of `num_samples` rows in .npy files under `folder`, filled batch by batch in any order."""

    def __init__(self, num_samples, folder):
        self.num_samples = num_samples
        self.folder = folder
        self.arrays = {}

    def put(self, indices, arrays):
        """Store the rows of a contiguous range of sample indices, one array per key."""
        for key, values in arrays.items():
            if key not in self.arrays:
                path = os.path.join(self.folder, f"{key}.npy")
                shape = (self.num_samples, *values.shape[1:])
                self.arrays[key] = np.lib.format.open_memmap(path, mode="w+", dtype=values.dtype, shape=shape)
            self.arrays[key][indices.start : indices.stop] = values


@contextlib.contextmanager
def spool_folder():
    """On rank 0, a temporary folder beside the outputs (the system's, for remote outputs); None elsewhere."""
    if dist_util.get_rank() != 0:
        yield None
        return
    log_dir = logger.get_dir()
    parent = log_dir if log_dir and is_local(log_dir) else None
    with tempfile.TemporaryDirectory(dir=parent, prefix=".samples_spool_") as folder:
        yield folder


def gather_lists(items):
    """Every rank's list `items` concatenated in rank order on rank 0; None on the other ranks."""
    if dist_util.get_world_size() == 1:
        return list(items)
    gathered = [None] * dist_util.get_world_size() if dist_util.get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return None if gathered is None else [item for rank_items in gathered for item in rank_items]


def gather_parts(parts):
    """
    Concatenate every rank's list of array dicts, in rank order, on rank 0.

    :param parts: list of dicts of NumPy arrays (the same keys in all).
    :return: dict of concatenated arrays on rank 0, None on other ranks.
    """
    parts = gather_lists(parts)
    if parts is None:
        return None
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
