"""From datasets to an endless, resumable stream of batches.

Every batch is a pure function of the run's seed and its position, never of what happened
before in the process. That is what lets a run killed mid-epoch continue with exactly the
batches (and random crops) an uninterrupted run would have seen, and lets N processes split the
global batch of a map-style dataset exactly as one process with N times the batch would see it.

- Map-style datasets (``cc_sbu_align``): global sample position ``p`` -> index
  ``perm_c[p mod len]`` with a fresh permutation per pass ``c = p // len`` seeded by
  ``(seed, c)``; global batch ``j`` is positions ``[j*B*W, (j+1)*B*W)`` and rank ``r`` takes its
  ``B``-slice. Each sample's augmentation is seeded by its position.
- Shard streams (``laion``, ``cc_sbu``): one endless stream per (rank, loader worker), seeded by
  ``(seed, rank, worker)``; the state is the number of raw tar samples each worker has consumed,
  and resuming replays (reads without decoding) that many.

A loader worker builds whole batches; ``DataLoader`` hands them out strictly round-robin over its
workers, which fixes the order.
"""
from __future__ import annotations

import hashlib
import logging
import random
import signal
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minigpt4.common.config import ConfigError
from minigpt4.common.dist_utils import STOP_SIGNALS
from minigpt4.common.feature_cache import image_key

logger = logging.getLogger(__name__)

# A shard stream refuses its data after this many unusable samples in a row (at least ten batches).
BROKEN_IN_A_ROW = 1000


class SampleError(Exception):
    """One sample that cannot be used (undecodable image, missing field); it is skipped."""


class DatasetError(ConfigError):
    """A dataset that cannot be used at all; the message starts with the config key."""


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and runs."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_call(seed: int, fn, *args):
    """``fn(*args)`` with torch's CPU RNG seeded by ``seed`` and restored afterwards.

    torchvision's random transforms draw from the global torch RNG; forking it keeps the main
    process's RNG stream (which a resumed run restores) independent of data loading.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep everything else as lists (``answer``, ``image_id``)."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class BatchStream(IterableDataset):
    """Endless batches of one dataset for one rank; see the module docstring for the order.

    ``dataset`` is either map-style (``__len__`` + ``load(index, seed)``) or a shard stream
    (``raw_samples(rng)`` + ``process(raw, seed)``). Batches carry a ``_meta`` dict that
    :class:`ResumableLoader` strips off to keep its state. With ``image_keys`` they also carry
    ``image_key``, each image's content hash (the feature cache's key), computed in the workers.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0, image_keys: bool = False):
        self.dataset = dataset
        self.image_keys = image_keys
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(num_workers, 1)
        self.start: dict[str, Any] = {"batches": 0, "raw": [0] * self.num_workers}
        self.is_stream = hasattr(dataset, "raw_samples")

    def _collate(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = collate(samples)
        if self.image_keys:
            batch["image_key"] = [image_key(image) for image in batch["image"]]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if self.is_stream:
            return self._stream_batches(physical)
        return self._map_batches(physical)

    # -- map-style --------------------------------------------------------------------------
    def _map_batches(self, physical: int) -> Iterator[dict[str, Any]]:
        n = len(self.dataset)
        global_batch = self.batch_size * self.world_size
        perm_cache: dict[int, list[int]] = {}

        def index_at(pos: int) -> int:
            cycle = pos // n
            if cycle not in perm_cache:
                perm_cache.clear()
                gen = torch.Generator().manual_seed(derive_seed(self.seed, "pass", cycle))
                perm_cache[cycle] = torch.randperm(n, generator=gen).tolist()
            return perm_cache[cycle][pos % n]

        # after a resume at batch k, DataLoader asks worker 0 first, so it must hold batch k
        j = self.start["batches"] + physical
        while True:
            first = j * global_batch + self.rank * self.batch_size
            samples, broken = [], 0
            for pos in range(first, first + self.batch_size):
                index = index_at(pos)
                # a broken sample is replaced by the next index: the batch keeps its size, so
                # DDP ranks stay in step, and the choice stays a function of the position
                for attempt in range(n):
                    try:
                        samples.append(self.dataset.load((index + attempt) % n, derive_seed(self.seed, "sample", pos)))
                        break
                    except SampleError as err:
                        broken += 1
                        logger.warning("skipping broken sample: %s", err)
                else:
                    raise DatasetError(f"{self.dataset.location}: no sample of {n} could be loaded")
            batch = self._collate(samples)
            batch["_meta"] = {"broken": broken}
            yield batch
            j += self.num_workers

    # -- shard streams ----------------------------------------------------------------------
    def _stream_batches(self, physical: int) -> Iterator[dict[str, Any]]:
        worker = (physical + self.start["batches"]) % self.num_workers
        rng = random.Random(derive_seed(self.seed, "stream", self.rank, worker))
        skip = self.start["raw"][worker]
        raw_count = 0
        stream = shuffled(self.dataset.raw_samples(rng), self.dataset.shuffle_buffer, rng)
        for _ in range(skip):  # replay without decoding to reach the saved position
            next(stream)
            raw_count += 1
        # Broken samples in a row: past this many, the data (not a sample) is wrong, e.g. every
        # caption under another key: an error, not an endless stream of warnings.
        in_a_row, most = 0, max(BROKEN_IN_A_ROW, 10 * self.batch_size)
        while True:
            samples, broken = [], 0
            while len(samples) < self.batch_size:
                raw = next(stream)
                seed = derive_seed(self.seed, "sample", self.rank, worker, raw_count)
                raw_count += 1
                try:
                    samples.append(self.dataset.process(raw, seed))
                    in_a_row = 0
                except SampleError as err:
                    broken += 1
                    in_a_row += 1
                    logger.warning("skipping broken sample: %s", err)
                    if in_a_row >= most:
                        raise DatasetError(f"{self.dataset.location}: the last {in_a_row} samples could not be used; the last: {err}") from None
            batch = self._collate(samples)
            batch["_meta"] = {"broken": broken, "worker": worker, "raw": raw_count}
            yield batch


def shuffled(items: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's buffer shuffle, driven by our own seeded ``rng`` so it can be replayed."""
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) < bufsize:
            continue
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _ignore_stop_signals(worker_id: int) -> None:
    # A scheduler signals every process of the job: the workers must outlive the main process's
    # last step and checkpoint, then go down with it.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class ResumableLoader:
    """A ``DataLoader`` over a :class:`BatchStream` that knows how far it has been consumed.

    The state counts batches *consumed* by the training loop (not the ones prefetched by
    workers), so it can be saved at any iteration.
    """

    def __init__(self, stream: BatchStream, num_workers: int = 0, pin_memory: bool = False):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.batches = 0
        self.raw = [0] * stream.num_workers
        self.broken = 0
        self._iter = None

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # its own generator: creating the iterator must not draw from the global torch RNG,
            # or a resumed run's RNG stream would differ from an uninterrupted one's
            generator=torch.Generator().manual_seed(self.stream.seed),
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        )

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            self._iter = iter(self._loader())
        batch = next(self._iter)
        meta = batch.pop("_meta")
        self.batches += 1
        self.broken += meta["broken"]
        if "worker" in meta:
            self.raw[meta["worker"]] = meta["raw"]
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = {"batches": self.batches, "raw": list(self.raw), "broken": self.broken}
        if self.stream.is_stream:
            state["shards"] = shard_list_digest(self.stream.dataset.shards)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._iter is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        if self.stream.is_stream and len(state["raw"]) != self.stream.num_workers:
            raise DatasetError(
                f"run.num_workers: the checkpoint's shard streams were read by {len(state['raw'])} loader workers, "
                f"this run has {self.stream.num_workers}; resuming exactly needs the same value"
            )
        saved = state.get("shards")
        if self.stream.is_stream and self.stream.rank == 0 and saved is not None and saved != shard_list_digest(self.stream.dataset.shards):
            # The stream draws its shards by position in this list: another list replays other samples.
            logger.warning("%s: the shards are not those the checkpoint read (%d then, %d now): the resumed run reads "
                           "other samples than an uninterrupted one would", self.stream.dataset.location, saved["count"],
                           len(self.stream.dataset.shards))
        self.batches, self.raw, self.broken = int(state["batches"]), list(state["raw"]), int(state["broken"])
        self.stream.start = {"batches": self.batches, "raw": list(self.raw)}

    def close(self) -> None:
        self._iter = None


def shard_list_digest(shards: Sequence[str]) -> dict[str, Any]:
    """What identifies a shard list in a checkpoint: its length and a hash of its file names in
    order (the names alone: the same shards moved to another folder are the same stream)."""
    names = "\n".join(str(shard).replace("\\", "/").rsplit("/", 1)[-1] for shard in shards)
    return {"count": len(shards), "sha256": hashlib.sha256(names.encode()).hexdigest()[:16]}


class MultiIterLoader:
    """Mixes several loaders: each iteration draws one with probability ∝ its ``sample_ratio``.

    The draw for iteration ``t`` is seeded by ``(seed, rank, t)``, so it needs no state beyond
    ``t`` to be replayed.
    """

    def __init__(self, loaders: Sequence[ResumableLoader], ratios: Sequence[float] | None = None, seed: int = 0, rank: int = 0,
                 names: Sequence[str] | None = None):
        ratios = list(ratios) if ratios is not None else [1.0] * len(loaders)
        if len(ratios) != len(loaders) or any(r <= 0 for r in ratios):
            raise DatasetError(f"sample_ratio: need one positive ratio per dataset, got {ratios}")
        self.loaders = list(loaders)
        # The datasets' names in the config's order: a draw picks by position, so a resume needs the same order.
        self.names = list(names) if names is not None else [str(i) for i in range(len(loaders))]
        if len(self.names) != len(self.loaders):
            raise ValueError(f"names: {len(self.names)} for {len(self.loaders)} loaders")
        self.ratios = ratios
        self.seed = seed
        self.rank = rank
        self.step = 0

    def __iter__(self) -> "MultiIterLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        rng = random.Random(derive_seed(self.seed, "mix", self.rank, self.step))
        loader = rng.choices(self.loaders, weights=self.ratios, k=1)[0]
        self.step += 1
        return next(loader)

    @property
    def broken(self) -> int:
        return sum(loader.broken for loader in self.loaders)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "names": self.names, "loaders": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["loaders"]) != len(self.loaders):
            raise DatasetError(f"datasets: the checkpoint mixed {len(state['loaders'])} datasets, this config has {len(self.loaders)}")
        saved = state.get("names")  # checkpoints before the names were kept: by position, as written
        if saved is not None and list(saved) != self.names:
            how = "in this order" if sorted(saved) == sorted(self.names) else "(other datasets)"
            raise DatasetError(
                f"datasets: the checkpoint mixed {', '.join(saved)} {how}, this config lists {', '.join(self.names)}; "
                "an exact resume needs the checkpoint's datasets in its order"
            )
        self.step = int(state["step"])
        for loader, sub in zip(self.loaders, state["loaders"]):
            loader.load_state_dict(sub)

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()


def move_to_device(samples: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in samples.items()}
