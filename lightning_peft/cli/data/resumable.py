"""A training loader whose position in the epoch is saved in Lightning checkpoints (mid-epoch resume).

Lightning 2.6 saves ``state_dict()`` of every training loader that has one (``loops.fit_loop.state_dict.
combined_loader`` in the checkpoint) and hands it back through ``load_state_dict`` before the resumed run draws a
batch. A plain ``DataLoader`` has neither, so a run resumed from a mid-epoch checkpoint restarts that epoch's
order at its first batch: it trains on batches it already saw and never on the rest. :class:`ResumableDataLoader`
saves the epoch and the number of batches it handed out, and its :class:`ResumableSampler` skips them on resume.
:func:`rng_state` / :func:`restore_rng` save and restore torch's random state with it, each DDP rank its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_peft.errors import PeftConfigError


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order (a permutation seeded by ``seed + epoch``, this rank's share of it) that
    starts ``start`` samples into the epoch the next time it is iterated (then ``start`` is back to 0).

    Being a ``DistributedSampler``, Lightning calls its ``set_epoch`` each epoch and, under DDP, keeps it rather
    than putting its own sampler in (build it with the trainer's ``num_replicas`` / ``rank``). ``len()`` stays the
    whole epoch: Lightning counts the batches left from the restored loop progress.
    """

    def __init__(
        self, dataset: Dataset, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` with ``state_dict`` / ``load_state_dict``: the epoch and
    how many of its batches were handed out, counted as they are yielded (worker processes read ahead; what they
    read but did not hand out yet is not counted), so a run resumed from a mid-epoch checkpoint sees exactly the
    batches an uninterrupted run would.

    Example:
        >>> loader = ResumableDataLoader(list(range(10)), batch_size=4, seed=0)
        >>> first = next(iter(loader))
        >>> loader.state_dict()
        {'epoch': 0, 'batches': 1}
        >>> again = ResumableDataLoader(list(range(10)), batch_size=4, seed=0)
        >>> again.load_state_dict({'epoch': 0, 'batches': 1})
        >>> [b.tolist() for b in again] == [b.tolist() for b in list(loader)[1:]]
        True
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        **kwargs: Any,
    ) -> None:
        sampler = kwargs.pop("sampler", None)
        if not isinstance(sampler, ResumableSampler):
            sampler = ResumableSampler(dataset, shuffle, seed, num_replicas, rank)  # type: ignore[arg-type]
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.epoch, self.batches_seen = sampler.epoch, 0  # batches handed out in that epoch
        self._resume: tuple[int, int] | None = None  # (epoch, batches) to skip, from load_state_dict
        #: asked when an iteration starts for a saved state not loaded yet (see :func:`unloaded_state`)
        self.pending_state: Callable[[], dict[str, int] | None] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()  # a generator: nothing is read (no worker started) before the first batch is asked

    def _iterate(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        state = self.pending_state() if self.pending_state is not None else None
        if state is not None:
            self.load_state_dict(state)
        skip = 0
        if self._resume is not None and self._resume[0] == sampler.epoch and self._resume[1] < len(self):
            skip = self._resume[1]
        self._resume = None
        self.epoch, self.batches_seen = sampler.epoch, skip
        sampler.start = skip * int(self.batch_size or 1)
        for batch in super().__iter__():
            self.batches_seen += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "batches": int(self.batches_seen)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or not {"epoch", "batches"} <= set(state):
            raise PeftConfigError(
                f"the checkpoint's train loader state {state!r} is not a ResumableDataLoader's "
                "({'epoch': ..., 'batches': ...}); was it written with another data module?"
            )
        self.epoch, self.batches_seen = int(state["epoch"]), int(state["batches"])
        self._resume = (self.epoch, self.batches_seen)
        self.sampler.set_epoch(self.epoch)  # type: ignore[attr-defined]  (Lightning sets the epoch again)


def unloaded_state(trainer: Any) -> dict[str, int] | None:
    """The train loader state a resumed fit restored but did not hand to the loader (then taken from the loop).

    Lightning loads the saved loader states only while the fit loop builds the train loader. Reading
    ``trainer.estimated_stepping_batches`` before the checkpoint's loop state is restored (a warm-up schedule
    in ``configure_optimizers``, say) builds it earlier, and the saved position would be dropped.
    """
    loop = getattr(trainer, "fit_loop", None)
    states = getattr(loop, "_combined_loader_states_to_load", None)
    if loop is None or not states or not loop.restarting:
        return None
    loop._combined_loader_states_to_load = []  # as Lightning does once it loaded them
    return states[0]  # TextDataModule has one train loader


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state() -> dict[str, Any]:
    """torch's random state (CPU, and CUDA's when CUDA is in use); under DDP also every rank's, in ``"ranks"``.

    The ranks' states differ after the first step (dropout draws as many numbers as a batch has tokens, and each
    rank pads its own batches), and only rank 0 writes the checkpoint: with rank 0's state alone, the other
    ranks would draw other dropout masks after a resume than the uninterrupted run did. Lightning calls a data
    module's ``state_dict`` on every rank when it saves (``Trainer.save_checkpoint``), so gathering here is safe.
    """
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    _, world = _world()
    if world > 1:
        ranks: list[Any] = [None] * world
        dist.all_gather_object(ranks, dict(rng))  # works on gloo and NCCL (NCCL moves it to this rank's GPU)
        rng["ranks"] = ranks
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved: this rank's own state when the world size is the saved one, else
    rank 0's (a checkpoint from another world size, or one written before the ranks were saved)."""
    rank, world = _world()
    ranks = rng.get("ranks")
    if isinstance(ranks, list) and len(ranks) == world:
        rng = ranks[rank]
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


__all__ = ["ResumableDataLoader", "ResumableSampler", "restore_rng", "rng_state", "unloaded_state"]
