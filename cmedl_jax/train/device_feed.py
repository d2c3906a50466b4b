"""Batches put on the devices ahead of the step that consumes them, each with the data position after it."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator


@dataclasses.dataclass
class FedBatch:
  """One step's input.

  Attributes:
    device: the batch on the devices (what the step takes).
    host: the same batch as numpy arrays (previews).
    position: the data iterator's state right after this batch: the position a checkpoint taken after the step
      that consumed it stores, so that a restore resumes with the next step's batch, whatever was prefetched.
  """

  device: Any
  host: dict
  position: Any


class DeviceFeed:
  """Iterates ``iterator``'s batches ``depth`` batches ahead, already transferred with ``to_device``.

  The transfers are asynchronous (``jax.device_put`` / ``make_array_from_process_local_data``), so while the step
  of batch ``i`` runs, batches ``i + 1 .. i + depth`` are read and copied to the devices. ``depth=0`` reads each
  batch when it is asked for.

  Args:
    iterator: a grain ``DatasetIterator`` (``next`` and ``get_state``).
    to_device: host batch -> device batch.
    depth: batches kept on the devices beyond the one being consumed.
  """

  def __init__(self, iterator: Iterator, to_device: Callable[[dict], Any], depth: int = 2):
    if depth < 0:
      raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    self._iterator, self._to_device, self._depth = iterator, to_device, int(depth)
    self._queue: collections.deque[FedBatch] = collections.deque()

  def __iter__(self):
    return self

  def __next__(self) -> FedBatch:
    while len(self._queue) <= self._depth:
      host = next(self._iterator)
      self._queue.append(FedBatch(device=self._to_device(host), host=host, position=self._iterator.get_state()))
    return self._queue.popleft()
