"""Unreadable records in real shards: a truncated shard, a flipped bit, a record that does not
decode. Each is skipped, named (shard and byte offset), counted, and the count is bounded."""

from __future__ import annotations

import os
import shutil

import pytest
import tensorflow as tf

from resnet_imagenet.data import bad_records, pipeline, tfrecord
from resnet_imagenet.errors import UserError
from tests.support.damage import flip_bit, record_offsets, truncate
from tests.support.shards import make_shards

SIZE = 32


@pytest.fixture(scope="module")
def sound(demo_raw, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sound"))
    make_shards(demo_raw, out, train_shards=4, validation_shards=2)
    return out


@pytest.fixture
def damaged(sound, tmp_path) -> tuple[str, dict]:
    """A copy of the shards with validation-0 truncated in its record 7, a bit flipped in
    record 4 of validation-1 and in record 10 of train-2; ``{shard: (offset, records read)}``."""
    out = str(tmp_path / "damaged")
    shutil.copytree(sound, out)
    where = {}
    for name, damage, record in (("validation-00000-of-00002", truncate, 7),
                                 ("validation-00001-of-00002", flip_bit, 4),
                                 ("train-00002-of-00004", flip_bit, 10)):
        where[name] = (damage(os.path.join(out, name), record), record)
    return out, where


def shard_records(path: str) -> int:
    return sum(1 for _ in tf.data.TFRecordDataset(path))


def test_evaluation_reads_each_damaged_shard_up_to_the_damage(sound, damaged, capfd):
    data_dir, where = damaged
    per_shard = {name: shard_records(os.path.join(sound, name)) for name in where}
    registry = bad_records.Registry()
    labels = [label for _, batch in pipeline.eval_dataset(
        tfrecord.shard_pattern(data_dir, "validation"), 8, SIZE, registry=registry)
        for label in batch.numpy()]
    assert len(labels) == 7 + 4  # the records before each damage
    lost = {name: per_shard[name] - read for name, (_, read) in where.items()}
    assert registry.shards() == [
        {"shard": os.path.join(data_dir, name), "offset": where[name][0], "records": lost[name]}
        for name in ("validation-00000-of-00002", "validation-00001-of-00002")]
    assert registry.records == 20 + 20 - 11  # the manifest's counts per shard: exact
    err = capfd.readouterr().err
    for name in ("validation-00000-of-00002", "validation-00001-of-00002"):
        assert (f"tf.data: skipped {os.path.join(data_dir, name)} from byte {where[name][0]} on "
                f"({lost[name]} records): the shard is truncated or corrupt there") in err


def test_without_a_manifest_the_records_lost_are_estimated(sound, damaged):
    data_dir, where = damaged
    os.remove(os.path.join(data_dir, "manifest.json"))
    registry = bad_records.Registry()
    read = sum(int(batch.shape[0]) for _, batch in pipeline.eval_dataset(
        tfrecord.shard_pattern(data_dir, "validation"), 8, SIZE, registry=registry))
    assert read == 11
    # A flipped bit leaves the bytes after it: their count at the shard's mean record size.
    # A truncated file is just shorter: what it lost is not in it (one record, the partial one).
    flipped, cut = (registry.shards()[i]["records"] for i in (1, 0))
    assert 16 - 3 <= flipped <= 16 + 3 and cut == 1


def test_the_training_stream_skips_damage_and_counts_it_with_the_examples(sound, damaged,
                                                                          capfd):
    data_dir, where = damaged
    lost = shard_records(os.path.join(sound, "train-00002-of-00004")) - 10  # per epoch
    registry = bad_records.Registry()
    ds = pipeline.train_dataset(tfrecord.shard_pattern(data_dir, "train"), 16, SIZE, seed=3,
                                shuffle_buffer=32, with_positions=True, with_skipped=True,
                                registry=registry)
    readable = sum(shard_records(p) for p in tf.io.gfile.glob(
        tfrecord.shard_pattern(sound, "train"))) - lost  # per epoch
    epochs = 3
    batches = epochs * readable // 16
    skipped = 0
    for _, labels, positions, batch_skipped in ds.take(batches):
        skipped += int(tf.reduce_sum(batch_skipped))
    assert pipeline.split_position(int(positions[-1]))[0] in (epochs - 1, epochs)
    # Each epoch skips the records after the flipped bit; a count goes with the first example
    # of the decode window (32 records) it was found in, so the sum is that of whole windows.
    assert (epochs - 1) * lost <= skipped <= (epochs + 1) * lost
    name = os.path.join(data_dir, "train-00002-of-00004")
    assert [(s["shard"], s["offset"]) for s in registry.shards()] == [(name, where[
        "train-00002-of-00004"][0])]
    assert f"tf.data: skipped {name} from byte" in capfd.readouterr().err


def test_a_record_that_does_not_decode_is_skipped_alone_naming_its_offset(sound, tmp_path,
                                                                            capfd):
    good = [r.numpy() for r in tf.data.TFRecordDataset(
        os.path.join(sound, "validation-00000-of-00002")).take(5)]
    broken = tfrecord.encode_example(tfrecord.ImageRecord(
        encoded=b"\xff\xd8\xff\xe0 not really a jpeg", height=10, width=10, label=3,
        synset="n00000002"))
    path = str(tmp_path / tfrecord.shard_name("validation", 0, 1))
    with tf.io.TFRecordWriter(path) as writer:
        for record in good[:2] + [broken, b"not an Example"] + good[2:]:
            writer.write(record)
    offsets = record_offsets(path)
    registry = bad_records.Registry()
    labels = [label for _, batch in pipeline.eval_dataset(
        tfrecord.shard_pattern(str(tmp_path), "validation"), 4, SIZE, registry=registry)
        for label in batch.numpy()]
    assert len(labels) == 5 and registry.records == 2
    assert registry.shards() == [{"shard": path, "offset": offsets[2], "records": 2}]
    err = capfd.readouterr().err
    for offset in offsets[2:4]:
        assert (f"tf.data: skipped {path} record at byte {offset}: it does not parse or its "
                "image does not decode") in err


def test_count_records_counts_past_damage_instead_of_failing(damaged):
    data_dir, _ = damaged
    # Read before each cut, plus the manifest's count of the rest: the manifest's total.
    assert pipeline.count_records(tfrecord.shard_pattern(data_dir, "validation")) == 40


@pytest.mark.parametrize("text, seen, per_epoch, limit", [
    ("0.1%", 100, 1_281_167, 1281.167),  # never less than a share of one epoch
    ("0.1%", 5_000_000, 1_281_167, 5000.0),  # then a share of the records seen
    ("0%", 10, 10, 0.0),
    ("500", 10, 10, 500.0),
    ("0", 10, 10, 0.0),
])
def test_the_bound_is_a_share_of_the_records_seen_or_a_count(text, seen, per_epoch, limit):
    bound = bad_records.Bound(text)
    assert bound.limit(seen, per_epoch) == pytest.approx(limit)
    assert not bound.exceeded(int(limit), seen, per_epoch)
    assert bound.exceeded(int(limit) + 1, seen, per_epoch)


@pytest.mark.parametrize("text", ["abc", "-1", "150%", "1.5", "%", ""])
def test_a_bad_bound_is_refused_in_one_line(text):
    with pytest.raises(UserError, match="--max-bad-records .*such as 0.1%.*such as 500") as info:
        bad_records.Bound(text)
    assert "\n" not in str(info.value)
