"""Which records each process reads: of every global batch, process k of n reads the k-th consecutive slice.

grain's DataLoader shards a sampler by interleaving (process k reads positions k, k + n, k + 2n, ... of one global
order). Stitched together by ``jax.make_array_from_process_local_data`` (process 0's slice first), those make a global
batch with the same records as one process reading positions 0..B-1, but in another order: the per-example noise
and timesteps drawn for row i would meet other examples, so a 2-process run would not reproduce a 1-process run.
:class:`BatchSliceSampler` maps the DataLoader's interleaved indices to consecutive slices of each global batch:
with local batch b, process k's m-th record is global position ``(m // b) * b * n + k * b + m % b``. Each record
keeps the metadata (index, augmentation randomness) of its global position, so every process count sees the same
global batches, row for row.
"""

from __future__ import annotations


class BatchSliceSampler:
    """Wraps a grain sampler (``__len__``, ``__getitem__(index) -> RecordMetadata``) for a DataLoader sharded with
    ``ShardOptions(shard_index, shard_count)`` and batches of ``local_batch`` records."""

    def __init__(self, sampler, local_batch: int, shard_index: int, shard_count: int):
        self.sampler, self.local_batch = sampler, local_batch
        self.shard_index, self.shard_count = shard_index, shard_count

    def __len__(self) -> int:
        return len(self.sampler)

    def global_position(self, index: int) -> int:
        """The position in the global order of the DataLoader's ``index`` (= m * shard_count + shard_index)."""
        m, shard = divmod(index, self.shard_count)
        b = self.local_batch
        return (m // b) * b * self.shard_count + shard * b + m % b

    def __getitem__(self, index: int):
        return self.sampler[self.global_position(index)]

    def __repr__(self) -> str:  # grain stores it in the iterator state and compares it when the state is restored
        return (f"BatchSliceSampler({self.sampler!r}, local_batch={self.local_batch}, "
                f"shard_index={self.shard_index}, shard_count={self.shard_count})")


def slice_batches(sampler, local_batch: int, shard_index: int, shard_count: int):
    """``sampler`` itself for one shard (its iterator states stay those of earlier runs), else a
    :class:`BatchSliceSampler`."""
    return sampler if shard_count == 1 else BatchSliceSampler(sampler, local_batch, shard_index, shard_count)
