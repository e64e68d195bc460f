"""Is there already a complete TFRecord dataset at a URI? Decided from file names alone.

The pipeline skips conversion when the TFRecords URI holds a usable dataset, which is either

* one written by ``resnet-imagenet convert``: ``manifest.json`` (written once every shard is
  complete) names the shard count of each split, and every shard of those counts is present;
  a converter's directory without it (its ``_shards/`` records only) is a run in progress; or
* shards made by the original Inception ``build_imagenet_data.py`` (no manifest): for each split
  one complete set ``<split>-00000-of-N`` ... ``<split>-(N-1)-of-N``.

Anything else (nothing there, a partial conversion, shards of two different counts) is not
ready, and the pipeline converts: the converter resumes a partial run and refuses a mix with
its own one-line error. No shard is opened: listing a bucket prefix is cheap, reading 1,152
shards is not.
"""

from __future__ import annotations

import json
from collections import defaultdict

from resnet_imagenet import storage
from resnet_imagenet.data import tfrecord
from resnet_imagenet.data.convert_state import MANIFEST_FILE as MANIFEST
from resnet_imagenet.data.convert_state import STATE_DIR as CONVERT_STATE


def _shard_sets(names: list[str]) -> dict[str, dict[int, set[int]]]:
    """``{split: {count: {indices present}}}`` from the file names of a directory."""
    found: dict[str, dict[int, set[int]]] = {s: defaultdict(set) for s in tfrecord.SPLITS}
    for name in names:
        parsed = tfrecord.parse_shard_name(name)
        if parsed:
            split, index, count = parsed
            found[split][count].add(index)
    return found


def inspect(data_dir: str) -> dict:
    """Describe the dataset at ``data_dir``.

    Returns ``{"ready": bool, "reason": str, "uri": data_dir, "source": "manifest" |
    "shard names" | None, "train": {"shards": n, "images": n or None}, "validation": {...},
    "classes": n or None}``; ``reason`` says what is missing when it is not ready.
    """
    data_dir = storage.normalize(data_dir)
    info: dict = {"ready": False, "uri": data_dir, "source": None, "classes": None,
                  "train": None, "validation": None}
    names = [n for n in storage.listdir(data_dir) if not storage.is_temp(n)]
    if not names:
        return {**info, "reason": f"no dataset at {data_dir}"}
    found = _shard_sets(names)

    if MANIFEST in names:
        manifest = json.loads(storage.read_text(storage.join(data_dir, MANIFEST)))
        info.update(source="manifest", classes=manifest.get("classes"))
        for split in tfrecord.SPLITS:
            count = int((manifest.get(split) or {}).get("shards") or 0)
            present = found[split].get(count, set())
            if not count or len(present) != count:
                return {**info, "reason": f"{MANIFEST} lists {count} {split} shards, "
                                          f"{len(present)} of them are present"}
            info[split] = {"shards": count, "images": manifest[split].get("images")}
        return {**info, "ready": True, "reason": f"complete dataset ({MANIFEST})"}

    if CONVERT_STATE in names:
        return {**info, "reason": "a conversion that has not been finalized (no "
                                  f"{MANIFEST}, but {CONVERT_STATE}/ of the converter)"}
    info["source"] = "shard names"
    for split in tfrecord.SPLITS:
        sets = found[split]
        if len(sets) != 1:
            counts = ", ".join(f"-of-{c:05d}" for c in sorted(sets)) or "none"
            return {**info, "reason": f"{split} shards: expected one complete set, found {counts}"}
        ((count, present),) = sets.items()
        if len(present) != count:
            return {**info, "reason": f"{split} shards: {len(present)} of {count} present"}
        info[split] = {"shards": count, "images": None}
    return {**info, "ready": True,
            "reason": "complete shard sets without a manifest (e.g. made by the Inception script)"}
