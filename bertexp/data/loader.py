"""Batches off the training thread: worker processes build, collate and mask the coming steps' batches
while the current step runs.

Step k's batch is the same whoever builds it: its rows come from the data position (index arithmetic), its
masks from the generator seeded by (seed, k), its masking ratio from the run's progress at step k. Workers
take every n-th step and torch's DataLoader hands their batches back in step order, so a run with workers
trains on exactly the batches of a run without them, and a resumed run on exactly those of an uninterrupted
one.

A step's global batch is `micro x chunks` rows, cut into micro-batches ("chunks") of `data.batch_size` rows,
each collated (padded to its own longest row) and masked on its own, from a generator seeded by (seed, k,
chunk). A rank builds only its chunks (under torchrun rank r has chunks r x accum ... r x accum + accum - 1),
so the global batch is the same for any split of its chunks into ranks and accumulation steps: 2 ranks x 1
micro-batch train on exactly what 1 process x 2 accumulated micro-batches trains on.

The masking ratio at step k must be known before step k runs. It is when the schedule is constant or the run
ends on `trainer.max_steps`; a schedule over a time, token or FLOP budget depends on how the run has gone
so far, and then batches are masked on the training thread (still collated in the workers).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bertexp.data.dataset import Position

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A step's seed for one stream of draws (1 + 7 x chunk: masking of a micro-batch; 2 + 7 x rank: dropout)."""
    return (seed * 1_000_003 + step * 7_919 + stream) % (2**63 - 1)


def mask_step(masker, batch: dict, seed: int, step: int, progress: float, generator: torch.Generator | None = None,
              chunk: int = 0):
    """Mask micro-batch `chunk` of step `step`: the same draws whichever rank, worker or thread does it."""
    gen = generator if generator is not None else torch.Generator()
    gen.manual_seed(step_seed(seed, step, 1 + 7 * chunk))
    return masker(batch, gen, progress)


def chunks_of(rank: int, accum: int) -> range:
    """The micro-batches of a step's global batch that rank `rank` trains on."""
    return range(rank * accum, (rank + 1) * accum)


class _StepBatches(IterableDataset):
    def __init__(self, data, masker, position: Position, micro: int, chunks: int, mine: range, seed: int,
                 first_step: int, progress_at: Callable[[int], float] | None):
        self.data, self.masker, self.position, self.micro, self.chunks = data, masker, position, micro, chunks
        self.mine, self.seed, self.first_step, self.progress_at = mine, seed, first_step, progress_at

    def __iter__(self):
        info = get_worker_info()
        me, n = (info.id, info.num_workers) if info else (0, 1)
        size = self.micro * self.chunks
        for k, (at, after) in enumerate(self.data.batch_rows(self.position, size)):
            if k % n != me:
                continue
            step = self.first_step + k
            out = []
            for c in self.mine:
                batch = self.data.batch_at(Position(at.epoch, at.index + c * self.micro), self.micro, within=size)
                masked = None
                if self.progress_at is not None:
                    masked = mask_step(self.masker, batch, self.seed, step, self.progress_at(step), chunk=c)
                out.append(pack(batch, masked) if info else (batch, masked))
            yield out, after


def pack(batch: dict, masked) -> tuple[torch.Tensor, list]:
    """A worker's batch as one byte tensor and its layout: one shared-memory transfer (and one pinned copy)
    per batch instead of one per tensor, which under load cost the loop milliseconds a step."""
    named = [("batch", k, v) for k, v in batch.items()]
    if masked is not None:
        named += [("masked", k, v) for k, v in masked._asdict().items()]
    named.sort(key=lambda x: -x[2].element_size())  # widest first: every view starts aligned
    layout, parts, offset = [], [], 0
    for group, name, t in named:
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        layout.append((group, name, t.dtype, tuple(t.shape), offset, flat.numel()))
        parts.append(flat)
        offset += flat.numel()
    return torch.cat(parts), layout


def unpack(buffer: torch.Tensor, layout: list) -> tuple[dict, object]:
    from bertexp.masking import Masked

    out: dict[str, dict] = {"batch": {}, "masked": {}}
    for group, name, dtype, shape, offset, n in layout:
        out[group][name] = buffer[offset : offset + n].view(dtype).view(shape)
    return out["batch"], (Masked(**out["masked"]) if out["masked"] else None)


def batch_stream(data, masker, position: Position, micro: int, chunks: int, mine: range, seed: int,
                 first_step: int, progress_at: Callable[[int], float] | None, num_workers: int,
                 pin_memory: bool) -> Iterator:
    """For steps first_step, first_step + 1, ...: (this rank's micro-batches, their maskings, the position after
    the global batch of `chunks` micro-batches of `micro` rows); `mine` are this rank's chunks, and a masking
    is None where the training thread must mask (see the module's doc). Close it to stop the workers."""
    dataset = _StepBatches(data, masker, position, micro, chunks, mine, seed, first_step, progress_at)
    if num_workers <= 0:
        for out, after in dataset:
            yield [b for b, _ in out], [m for _, m in out], after
        return
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=4, multiprocessing_context="fork")
    it = iter(loader)
    # A thread receives the workers' batches (unpickling, shared memory, pinning) while the step computes, so
    # the training thread only takes a ready batch from a queue.
    ready: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def offer(item) -> bool:
        """Queue `item` unless the stream is closed first (then False)."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def receive() -> None:
        try:
            for packed, after in it:
                out = [unpack(buffer, layout) for buffer, layout in packed]
                if not offer(([b for b, _ in out], [m for _, m in out], after)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            offer(e)

    thread = threading.Thread(target=receive, name="batch-receiver", daemon=True)
    thread.start()
    try:
        while True:
            # The last batch is released before the next one is taken: taking one wakes the receiver, and
            # freeing a shared-memory batch (munmap) lets it take the GIL, which this thread then waits up to
            # the switch interval (5 ms) to get back. Released first, it costs about 0.2 ms.
            item = None
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
        it._shutdown_workers()  # now, not when the garbage collector gets to it
