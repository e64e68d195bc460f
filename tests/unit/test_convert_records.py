"""The hand-written Example encoding and TFRecord framing equal TensorFlow's, byte for byte."""

from __future__ import annotations

import pytest
import tensorflow as tf

from resnet_imagenet.data import records
from resnet_imagenet.data.tfrecord import ImageRecord, encode_example, read_records

RECORDS = [
    ImageRecord(encoded=b"\xff\xd8" + bytes(range(256)) * 40 + b"\xff\xd9", height=375, width=500,
                label=1, synset="n01440764", text="tench, Tinca tinca", filename="n01440764_1.JPEG",
                boxes=[(0.1, 0.2, 0.5, 0.6), (0.0, 0.0, 1.0, 1.0)]),
    ImageRecord(encoded=b"\xff\xd8tiny\xff\xd9", height=1, width=70000, label=1000,
                synset="n15075141", text="toilet tissue, toilet paper, bathroom tissue",
                filename="ILSVRC2012_val_00050000.JPEG", channels=1, colorspace="Grayscale"),
    ImageRecord(encoded=b"", height=0, width=0, label=0, synset="", text="écrevisse ✓"),
]


@pytest.mark.parametrize("rec", RECORDS, ids=["boxes", "grey-no-boxes", "empty-fields"])
def test_example_matches_protobuf_deterministic_serialization(rec):
    proto = tf.train.Example.FromString(encode_example(rec))
    expected = proto.SerializeToString(deterministic=True)
    assert records.serialize_example(rec) == expected
    head, jpeg, tail = records.example_parts(rec)
    assert jpeg is rec.encoded  # the JPEG is passed through, not copied
    assert head + jpeg + tail == expected


def test_int64_values_of_every_size_match_protobuf():
    # A Feature's serialization is exactly what the encoder embeds for one key.
    for value in (0, 127, 128, 300, 2**31, 2**63 - 1, -1, -(2**63)):
        feature = tf.train.Feature(int64_list=tf.train.Int64List(value=[value, 5]))
        assert records._int64_feature([value, 5]) == feature.SerializeToString()


def test_record_framing_matches_tfrecordwriter_and_reads_back(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    with open(ours, "wb") as f:
        writer = records.RecordWriter(f)
        for rec in RECORDS:
            writer.write(*records.example_parts(rec))
    with tf.io.TFRecordWriter(str(theirs)) as writer:
        for rec in RECORDS:
            writer.write(records.serialize_example(rec))
    assert ours.read_bytes() == theirs.read_bytes()
    back = read_records(str(ours))  # TFRecordDataset checks both CRCs of every record
    assert [(r["label"], r["text"], r["encoded"]) for r in back] == \
        [(r.label, r.text, r.encoded) for r in RECORDS]
    assert [pytest.approx(box) for box in RECORDS[0].boxes] == back[0]["boxes"]


def test_damaged_record_is_rejected_by_tensorflow(tmp_path):
    path = tmp_path / "shard"
    with open(path, "wb") as f:
        records.RecordWriter(f).write(records.serialize_example(RECORDS[0]))
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        read_records(str(path))
