"""Records that cannot be read: skipped, named in the log, counted, and bounded.

Two kinds of damage, both skipped rather than ending a run that has days to go:

* **a shard whose framing is corrupt** -- truncated, or a bit flipped anywhere in a record
  (TFRecord keeps a CRC of each record's length and of its data). TensorFlow's reader stops at
  such a record and cannot find the next one, so the rest of that shard is skipped: each shard
  is read by its own reader whose error is swallowed (``ignore_errors``), and where its records
  end before its bytes do (or before the manifest's count for it), the shard was cut at that
  offset. The records lost are the manifest's count less those read; shards converted before
  the manifest had per-shard counts get an estimate (the framing that would tell is what broke).
* **a record that reads but does not parse or decode** (a bad JPEG, a malformed Example): that
  record alone is skipped, by the decode windows of :mod:`~resnet_imagenet.data.pipeline`.

Every skip is logged on stderr with the shard and the byte offset, by ``tf.print`` (it shows
from tf.data's threads and on tf.data service workers alike, whatever TF_CPP_MIN_LOG_LEVEL is),
and counted twice: in the training stream itself (the first example of each decode window
carries the count of records its window skipped, so the training step all-reduces the counts
with the loss and every worker sees the same total at the same step) and in a
:class:`Registry` of this process (which shards, from which offset), from which the messages
and summaries name the shards.

The bound, ``--max-bad-records``: a share of the records seen (``0.1%``, the default) or a
count (``500``). A share is of the records seen so far, but never of fewer than one epoch's:
a shard cut on the first step is 0.1% of ImageNet's 1,024, not 50% of the records read by then.
"""

from __future__ import annotations

import json
import math
import threading

from resnet_imagenet import storage
from resnet_imagenet.errors import UserError

HEADER_BYTES = 16  # per TFRecord record: length (8 bytes), its CRC (4), then the data's CRC (4)
READ_BUFFER_BYTES = 8 << 20  # per open shard: large sequential reads suit GCS and local disks
END = b"\0resnet-imagenet: end of shard\0"  # never an Example: a protobuf has no field 0
SCAN_BATCH = 64  # records whose offsets are worked out together


class Bound:
    """``--max-bad-records``: ``"0.1%"`` (a share of the records seen) or ``"500"`` (a count)."""

    def __init__(self, text: str):
        self.text = text = str(text).strip()
        try:
            if text.endswith("%"):
                self.share, self.count = float(text[:-1]) / 100.0, None
                valid = 0.0 <= self.share <= 1.0
            else:
                self.share, self.count = None, int(text)
                valid = self.count >= 0
        except ValueError:
            valid = False
        if not valid:
            raise UserError(f"--max-bad-records {text!r}: give a share of the records seen, "
                            "such as 0.1%, or a count of records, such as 500")

    def limit(self, seen: int, per_epoch: int) -> float:
        """The most records that may be skipped once ``seen`` records have been read."""
        if self.count is not None:
            return float(self.count)
        return self.share * max(seen, per_epoch)

    def exceeded(self, skipped: int, seen: int, per_epoch: int) -> bool:
        return skipped > self.limit(seen, per_epoch)


class Registry:
    """What one process's input pipelines skipped: ``{shard: [first offset, records]}``.

    Filled from tf.data's threads (through ``tf.py_function``: not on tf.data service workers,
    whose datasets cannot hold Python). :meth:`clear` starts a new pass (an evaluation)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._shards: dict[str, list[int]] = {}

    def add(self, paths, offsets, counts) -> None:
        with self._lock:
            for path, offset, count in zip(*(getattr(t, "numpy", lambda t=t: t)()
                                             for t in (paths, offsets, counts))):
                path = path.decode() if isinstance(path, bytes) else str(path)
                entry = self._shards.setdefault(path, [int(offset), 0])
                entry[0] = min(entry[0], int(offset))
                entry[1] += int(count)

    def clear(self) -> None:
        with self._lock:
            self._shards.clear()

    @property
    def records(self) -> int:
        with self._lock:
            return sum(count for _, count in self._shards.values())

    def shards(self) -> list[dict]:
        """``[{"shard", "offset", "records"}]``, by shard name."""
        with self._lock:
            return [{"shard": path, "offset": offset, "records": count}
                    for path, (offset, count) in sorted(self._shards.items())]

    def describe(self, most: int = 5) -> str:
        """``"train-00003-of-01024 from byte 1234 (600 records), ..."`` for messages."""
        shards = self.shards()
        text = ", ".join(f"{storage.basename(s['shard'])} from byte {s['offset']} "
                         f"({s['records']} record{'s' if s['records'] != 1 else ''})"
                         for s in shards[:most])
        return text + (f" and {len(shards) - most} more" if len(shards) > most else "")


def shard_facts(files: list[str]) -> tuple[list[int], list[int], list[int]]:
    """Each shard's size in bytes (one listing per directory, not a request per shard), its
    records as the manifest lists them and its split's mean records per shard (-1 where the
    manifest does not say: an older one has no per-shard list, shards without one nothing)."""
    listed: dict[str, int] = {}
    for directory in sorted({storage.dirname(f) for f in files}):
        listed.update(storage.sizes(directory))
    manifests: dict[str, dict] = {}
    exact, mean = [], []
    for path in files:
        directory = storage.dirname(path)
        if directory not in manifests:
            try:
                manifests[directory] = json.loads(storage.read_text(
                    storage.join(directory, "manifest.json")))
            except (FileNotFoundError, ValueError):
                manifests[directory] = {}
        facts = _expected(manifests[directory], storage.basename(path))
        exact.append(facts[0])
        mean.append(facts[1])
    return [listed.get(storage.normalize(f), -1) for f in files], exact, mean


def _expected(manifest: dict, name: str) -> tuple[int, int]:
    from resnet_imagenet.data import tfrecord

    parsed = tfrecord.parse_shard_name(name)
    split = manifest.get(parsed[0]) if parsed else None
    if not isinstance(split, dict):
        return -1, -1
    counts = split.get("shard_images")
    exact = (int(counts[parsed[1]]) if isinstance(counts, list) and len(counts) == parsed[2]
             else -1)
    try:
        return exact, round(int(split["images"]) / int(split["shards"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return exact, -1


def shard_records(path, size, exact, mean):
    """One shard's records as ``(path, offset, weight, serialized)``. ``size``: its bytes;
    ``exact``: its records, ``mean``: its split's mean per shard (-1: unknown).

    ``offset`` is the record's byte offset in the shard, ``weight`` 1. After the last record
    comes a marker, :data:`END` (it fails to parse, so it is dropped as every bad record is),
    at the offset where the reader stopped: its weight is 0 when the shard was read whole, and
    minus the records lost when it was cut short (the reader failed before ``size`` bytes, or
    read fewer records than ``exact``: a truncated file is just shorter). Those are ``exact``
    less the records read, else an estimate: the larger of ``mean`` less those read and the
    bytes left at the shard's mean record size (at least 1). A marker rather than a filter, and
    offsets by runs of records: per record, the pipeline's CPU time grows by ~1% only.
    """
    import tensorflow as tf

    size, exact, mean = (tf.cast(v, tf.int64) for v in (size, exact, mean))
    # In runs of SCAN_BATCH records: one scan call per run, not per record.
    records = tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES).ignore_errors()
    runs = records.batch(SCAN_BATCH).concatenate(
        tf.data.Dataset.from_tensors(tf.constant([END])))

    def step(state, run):
        offset, count = state[0], state[1]
        lengths = tf.strings.length(run, unit="BYTE") + HEADER_BYTES
        lengths = tf.cast(lengths, tf.int64)
        offsets = offset + tf.cumsum(lengths, exclusive=True)
        # Only the marker's run (the last, of one) can be a cut.
        cut = tf.logical_or(offset < size, tf.logical_and(exact >= 0, count < exact))
        by_bytes = tf.cast(tf.math.ceil(tf.cast(size - offset, tf.float64) * tf.cast(
            count, tf.float64) / tf.cast(tf.maximum(offset, 1), tf.float64)), tf.int64)
        estimate = tf.where(exact >= 0, exact - count, tf.maximum(mean - count, by_bytes))
        lost = tf.where(cut, tf.maximum(estimate, 1), tf.constant(0, tf.int64))
        weights = tf.where(tf.equal(run, END), -lost, tf.constant(1, tf.int64))
        n = tf.size(run, out_type=tf.int64)
        return (tf.stack([offset + tf.reduce_sum(lengths), count + n]),
                (tf.fill([n], path), offsets, weights, run))

    return runs.scan(tf.constant([0, 0], tf.int64), step).unbatch()


def report(failed, paths, offsets, weights, registry: Registry | None):
    """Log and register the records of one decode window that were skipped (``failed``: a bool
    mask over the window; ``weights`` as :func:`shard_records` gives them); returns how many
    records they stand for (a cut shard's marker: the records it lost)."""
    import sys

    import tensorflow as tf

    bad = tf.logical_and(failed, tf.not_equal(weights, 0))
    counts = tf.where(bad, tf.abs(weights), tf.constant(0, tf.int64))

    def log_them():
        bad_paths, bad_offsets = tf.boolean_mask(paths, bad), tf.boolean_mask(offsets, bad)
        bad_counts = tf.boolean_mask(counts, bad)
        cut = tf.boolean_mask(weights, bad) < 0
        lines = tf.strings.join([
            "tf.data: skipped ", bad_paths,
            tf.where(cut, " from byte ", " record at byte "), tf.strings.as_string(bad_offsets),
            tf.where(cut, tf.strings.join([
                " on (", tf.strings.as_string(bad_counts),
                " records): the shard is truncated or corrupt there (TFRecord length or CRC)"]),
                ": it does not parse or its image does not decode")])
        tf.print(tf.strings.reduce_join(lines, separator="\n"), output_stream=sys.stderr)
        if registry is not None:
            tf.py_function(registry.add, [bad_paths, bad_offsets, bad_counts], [])
        return tf.reduce_sum(counts)

    return tf.cond(tf.reduce_any(bad), log_them, lambda: tf.reduce_sum(counts))


def too_many(bound: Bound, skipped: int, seen: int, per_epoch: int, registry: Registry,
             what: str) -> UserError:
    """The one-line stop once ``skipped`` of ``seen`` records passed ``bound``; it names the
    shards this process skipped records of (each worker names its own)."""
    shards = registry.describe()
    where = (f"in {shards}" if shards else
             "in shards named by the 'tf.data: skipped' lines of the other workers' logs")
    return UserError(
        f"{skipped} of {seen} {what} records could not be read, more than --max-bad-records "
        f"{bound.text} allows ({math.floor(bound.limit(seen, per_epoch))}), {where}: convert "
        "those shards again (or restore them from a copy), or raise --max-bad-records")
