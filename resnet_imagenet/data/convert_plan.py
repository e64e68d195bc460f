"""The shard plan of a conversion: which images go into which shard, and the configuration.

The plan is a pure function of the sorted input listing, the seed and the shard counts, so
every task of a distributed conversion computes the same one without talking to the others.

    plan = make_plan(dataset, train_shards=1024, validation_shards=128, seed=0)
    plan.owned(num_tasks, task_index)   # the shards one task writes
    plan.fingerprint                    # names the configuration in OUT/_shards/config.json
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from resnet_imagenet.data.imagenet import RawDataset, RawFile
from resnet_imagenet.data.tfrecord import shard_name

# Bump when the bytes written for the same input change, so old outputs count as foreign.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    count: int
    files: tuple[RawFile, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.count)


@dataclass(frozen=True)
class Plan:
    """Every shard of both splits (train first) and the configuration they are made from."""

    shards: tuple[Shard, ...]
    config: dict

    @property
    def fingerprint(self) -> str:
        return self.config["fingerprint"]

    def owned(self, num_tasks: int, task_index: int) -> list[Shard]:
        """The shards task ``task_index`` of ``num_tasks`` writes: k with k % T == I."""
        return [s for k, s in enumerate(self.shards) if k % num_tasks == task_index]


def spread(files: tuple[RawFile, ...] | list[RawFile], split: str, count: int,
           seed: int) -> list[Shard]:
    """Shuffle ``files`` with ``seed`` and cut them into ``count`` shards of near-equal size.

    The order is that of SHA-256(seed, path): it mixes the classes over the shards like the
    Inception script's seeded shuffle, depends on nothing but the paths (not on the listing
    order, the Python version or the platform), and is the same in every task.
    """
    def key(raw: RawFile) -> bytes:
        return hashlib.sha256(f"{seed}\0{raw.rel}".encode()).digest()

    ordered = sorted(files, key=key)
    bounds = [len(ordered) * i // count for i in range(count + 1)]
    return [Shard(split, i, count, tuple(ordered[bounds[i]:bounds[i + 1]])) for i in range(count)]


def _input_digest(dataset: RawDataset) -> str:
    """What of the input decides the output: classes, texts, the listing, the box files.

    File contents are not read (that would cost a pass over the data); a file replaced under
    the same name is not noticed, which is what --overwrite is for.
    """
    digest = hashlib.sha256(json.dumps(
        {"synsets": dataset.synsets, "texts": dataset.texts}, sort_keys=True).encode())
    for raw in dataset.train + dataset.validation:
        digest.update(f"{raw.rel}\t{raw.label}\t{raw.boxes_rel or ''}\n".encode())
    return digest.hexdigest()


def make_plan(dataset: RawDataset, train_shards: int, validation_shards: int, seed: int,
              validate: str = "header") -> Plan:
    """The plan for ``dataset``; its config (and fingerprint) covers everything that decides
    the bytes written."""
    config = {
        "version": FORMAT_VERSION,
        "seed": seed,
        "train_shards": train_shards,
        "validation_shards": validation_shards,
        "validate": validate,
        "input": _input_digest(dataset),
        "synsets": list(dataset.synsets),
        "class_text": dict(dataset.texts),
    }
    config["fingerprint"] = hashlib.sha256(
        json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    shards = (spread(dataset.train, "train", train_shards, seed)
              + spread(dataset.validation, "validation", validation_shards, seed))
    return Plan(tuple(shards), config)


def planned_names(config: dict) -> list[str]:
    """The shard names of a plan's ``config`` (train first), as a finalize reads it back."""
    return ([shard_name("train", i, config["train_shards"]) for i in range(config["train_shards"])]
            + [shard_name("validation", i, config["validation_shards"])
               for i in range(config["validation_shards"])])
