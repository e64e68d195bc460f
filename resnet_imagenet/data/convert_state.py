"""What a conversion leaves in OUT besides the shards, and what a rerun or a finalize reads.

    OUT/_shards/config.json        the plan's configuration (and fingerprint)
    OUT/_shards/<shard>.json       one per complete shard: image count, skipped files, fingerprint
    OUT/labels.txt, manifest.json  written by :func:`finalize` once every shard is complete

A shard counts as complete when it exists and its record carries the configuration's
fingerprint; :func:`conflict` says why OUT must not be mixed with a new plan, and
:func:`remove_stale` / :func:`remove_temps` clean up for --overwrite and after killed writers.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from resnet_imagenet import storage
from resnet_imagenet.data.convert_plan import Plan, planned_names
from resnet_imagenet.data.tfrecord import parse_shard_name
from resnet_imagenet.errors import UserError

STATE_DIR = "_shards"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"
STATE_THREADS = 32  # parallel reads of the per-shard records (over a thousand on GCS)


def state_uri(out_dir: str, name: str) -> str:
    """``OUT/_shards/<name>``."""
    return storage.join(out_dir, STATE_DIR, name)


def read_json(uri: str) -> dict | None:
    """The JSON object at ``uri``, or None when it is missing or incomplete."""
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # cut short by a crash on a filesystem without atomic rename: not complete


def write_json(uri: str, value: dict) -> None:
    storage.write_text(uri, json.dumps(value, indent=1, sort_keys=True) + "\n")


def read_records(out_dir: str, names: list[str]) -> dict[str, dict]:
    """The per-shard records that exist for ``names`` (read in parallel: many on GCS)."""
    present = set(storage.listdir(storage.join(out_dir, STATE_DIR)))
    wanted = [n for n in names if n + ".json" in present]
    with ThreadPoolExecutor(STATE_THREADS) as pool:
        found = pool.map(lambda n: read_json(state_uri(out_dir, n + ".json")), wanted)
        return {n: r for n, r in zip(wanted, found) if r is not None}


def _differences(old: dict, new: dict) -> str:
    parts = [f"{key} {old.get(key)} -> {new[key]}"
             for key in ("seed", "train_shards", "validation_shards", "validate", "version")
             if old.get(key) != new[key]]
    if old.get("input") != new["input"]:
        parts.append("another input listing")
    return ", ".join(parts) or "another configuration"


def conflict(plan: Plan, names: set[str], config: dict | None) -> str | None:
    """Why OUT (file ``names``, recorded ``config``) holds shards ``plan`` must not mix with,
    or None."""
    shards = sorted(n for n in names if parse_shard_name(n))
    planned = set(planned_names(plan.config))
    foreign = [n for n in shards if n not in planned]
    if config is not None and config.get("fingerprint") != plan.fingerprint:
        return f"shards of a different configuration ({_differences(config, plan.config)})"
    if config is None and shards:
        return f"shards this converter did not record (e.g. {shards[0]})"
    if foreign:
        return f"shards of another shard count (e.g. {foreign[0]})"
    return None


def _temp_target(name: str) -> str | None:
    """The final name of a temporary file from storage.temp_name (``.tmp-<hex>-<name>``)."""
    if not storage.is_temp(name):
        return None
    parts = name.split("-", 2)
    return parts[2] if len(parts) == 3 else None


def remove_temps(out_dir: str, shard_names: set[str]) -> None:
    """Delete leftovers of killed writers of these shards (and of their records)."""
    for directory, suffix in ((out_dir, ""), (storage.join(out_dir, STATE_DIR), ".json")):
        for name in storage.listdir(directory):
            target = _temp_target(name)
            if target is not None and target.endswith(suffix) and \
                    target[:len(target) - len(suffix)] in shard_names:
                storage.remove(storage.join(directory, name))


def remove_stale(out_dir: str, plan: Plan, names: set[str]) -> None:
    """--overwrite: delete what belongs to no shard of this plan, and the old summary files.

    Shards whose names this plan also uses are left to their owning task, which rewrites them
    (their records carry the old fingerprint, so they do not count as complete). Deleting only
    names no task of this plan writes keeps concurrent tasks from deleting each other's work.
    """
    planned = set(planned_names(plan.config))
    for name in sorted(names):
        if (parse_shard_name(name) and name not in planned) or name in (MANIFEST_FILE, LABELS_FILE):
            storage.remove(storage.join(out_dir, name))
    state_dir = storage.join(out_dir, STATE_DIR)
    for name in storage.listdir(state_dir):
        stem = name[:-len(".json")] if name.endswith(".json") else None
        if stem is not None and parse_shard_name(stem) and stem not in planned:
            storage.remove(storage.join(state_dir, name))


class Incomplete(Exception):
    """Some shards of OUT's configuration have no complete record yet (other tasks' work)."""

    def __init__(self, missing: list[str], total: int):
        super().__init__(f"{len(missing)} of {total} shards are not complete yet "
                         f"(e.g. {missing[0]})")
        self.missing = missing


def finalize(out_dir: str) -> dict:
    """Write labels.txt and manifest.json once every shard of OUT's configuration is complete.

    Needs only OUT (the configuration is in OUT/_shards/config.json). Raises
    :class:`Incomplete` while shards are missing. Deterministic: rerunning writes the same
    bytes, so several tasks may finalize.
    """
    out_dir = storage.normalize(out_dir)
    config = read_json(state_uri(out_dir, CONFIG_FILE))
    if config is None:
        raise UserError(f"{out_dir} holds no conversion to finalize "
                        f"({STATE_DIR}/{CONFIG_FILE} is missing): run convert first")
    names = planned_names(config)
    # Listings first: while other tasks are still at work this costs two requests, not one
    # read per shard record.
    present = set(storage.listdir(out_dir))
    present_records = set(storage.listdir(storage.join(out_dir, STATE_DIR)))
    missing = [n for n in names if n not in present or n + ".json" not in present_records]
    if not missing:
        records = read_records(out_dir, names)
        missing = [n for n in names
                   if records.get(n, {}).get("fingerprint") != config["fingerprint"]]
    if missing:
        raise Incomplete(missing, len(names))
    remove_temps(out_dir, set(names))
    manifest = {"schema": "inception", "classes": len(config["synsets"]),
                "class_text": config["class_text"], "seed": config["seed"],
                "fingerprint": config["fingerprint"]}
    for split in ("train", "validation"):
        split_names = [n for n in names if n.startswith(split + "-")]
        manifest[split] = {"shards": len(split_names),
                           "images": sum(records[n]["images"] for n in split_names),
                           # in shard order: what a reader finds short in a damaged shard
                           "shard_images": [records[n]["images"] for n in split_names]}
    manifest["skipped"] = sorted((s for n in names for s in records[n]["skipped"]),
                                 key=lambda s: s["file"])
    storage.write_text(storage.join(out_dir, LABELS_FILE), "".join(
        f"{wnid}\n" for wnid in config["synsets"]))
    # The manifest goes last: its presence means the whole output is there.
    storage.write_text(storage.join(out_dir, MANIFEST_FILE),
                  json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
