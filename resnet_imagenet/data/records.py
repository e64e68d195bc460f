"""Inception Examples and TFRecord framing written by hand: fast, deterministic, TF-free.

The converter's inner loop is "read a JPEG, wrap it, write it"; at ~0.1 ms per image the
protobuf library and ``tf.io.TFRecordWriter`` would be most of the cost (building a
``tf.train.Example`` copies the JPEG twice and costs ~0.1 ms by itself). Both formats are small:

* ``tf.train.Example`` is ``Features{map<string, Feature>}``; a map is a repeated
  ``{key = 1, value = 2}`` entry, a ``Feature`` is a oneof of ``BytesList`` (1), ``FloatList`` (2)
  and ``Int64List`` (3), each a ``repeated value = 1`` (numbers packed). We emit the keys in
  sorted order, which is exactly protobuf's deterministic serialization, so the bytes do not
  depend on the process (the default serialization of a map follows a per-process hash order).
* A TFRecord is ``uint64 length, uint32 masked_crc32c(length), data, uint32 masked_crc32c(data)``,
  little-endian.

The JPEG is never copied into a new buffer: an Example is produced as ``(head, jpeg, tail)`` and
the CRC is extended over the three pieces. The keys and types are those of
:func:`resnet_imagenet.data.tfrecord.encode_example`; a unit test holds the two equal.
"""

from __future__ import annotations

import functools
import struct
from typing import IO

import google_crc32c

from resnet_imagenet.data.tfrecord import ImageRecord

ENCODED_KEY = "image/encoded"
_SMALL_VARINTS = [bytes([i]) for i in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _SMALL_VARINTS[value]
    value &= (1 << 64) - 1  # negative int64 values are ten-byte two's complement varints
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited_header(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(length)


def _delimited(field: int, payload: bytes) -> bytes:
    return _delimited_header(field, len(payload)) + payload


def _bytes_feature(values: list[bytes]) -> bytes:
    return _delimited(1, b"".join(_delimited(1, v) for v in values))


def _float_feature(values: list[float]) -> bytes:
    packed = struct.pack(f"<{len(values)}f", *values)
    return _delimited(2, _delimited(1, packed) if values else b"")


def _int64_feature(values: list[int]) -> bytes:
    packed = b"".join(_varint(v) for v in values)
    return _delimited(3, _delimited(1, packed) if values else b"")


@functools.lru_cache(maxsize=None)
def _key(key: str) -> bytes:
    return _delimited(1, key.encode())


def _entry(key: str, feature: bytes) -> bytes:
    """One ``feature`` map entry, as the repeated field 1 of ``Features``."""
    return _delimited(1, _key(key) + _delimited(2, feature))


@functools.lru_cache(maxsize=1 << 14)
def _text_entry(key: str, value: str) -> bytes:
    return _entry(key, _bytes_feature([value.encode()]))


@functools.lru_cache(maxsize=1 << 14)
def _int_entry(key: str, value: int) -> bytes:
    return _entry(key, _int64_feature([value]))


def _entries(rec: ImageRecord) -> dict[str, bytes]:
    """Serialized map entry of every key except the JPEG (see :func:`example_parts`).

    Most values repeat from image to image (class, text, format, common sizes): those entries
    are cached, which makes the encoding cost a few microseconds.
    """
    boxes = list(rec.boxes)
    return {
        "image/height": _int_entry("image/height", rec.height),
        "image/width": _int_entry("image/width", rec.width),
        "image/colorspace": _text_entry("image/colorspace", rec.colorspace),
        "image/channels": _int_entry("image/channels", rec.channels),
        "image/class/label": _int_entry("image/class/label", rec.label),
        "image/class/synset": _text_entry("image/class/synset", rec.synset),
        "image/class/text": _text_entry("image/class/text", rec.text),
        **{f"image/object/bbox/{name}": _entry(f"image/object/bbox/{name}",
                                               _float_feature([box[i] for box in boxes]))
           for i, name in enumerate(("xmin", "ymin", "xmax", "ymax"))},
        "image/object/bbox/label": _entry("image/object/bbox/label",
                                          _int64_feature([rec.label] * len(boxes))),
        "image/format": _text_entry("image/format", rec.image_format),
        "image/filename": _entry("image/filename", _bytes_feature([rec.filename.encode()])),
    }


def example_parts(rec: ImageRecord) -> tuple[bytes, bytes, bytes]:
    """The serialized Example as ``(head, rec.encoded, tail)``: their concatenation.

    Map entries are in key order (protobuf's deterministic serialization); the JPEG's entry
    is built around the JPEG without copying it.
    """
    jpeg = rec.encoded
    # Entry{key: "image/encoded", value: Feature{bytes_list: BytesList{value: [jpeg]}}}
    list_head = _delimited_header(1, len(jpeg))
    feature_head = _delimited_header(1, len(list_head) + len(jpeg)) + list_head
    entry_head = (_key(ENCODED_KEY) + _delimited_header(2, len(feature_head) + len(jpeg))
                  + feature_head)
    entry_head = _delimited_header(1, len(entry_head) + len(jpeg)) + entry_head

    entries = _entries(rec)
    head = b"".join([entries[key] for key in sorted(entries) if key < ENCODED_KEY]) + entry_head
    tail = b"".join([entries[key] for key in sorted(entries) if key > ENCODED_KEY])
    # Example{features: Features{...}}
    return _delimited_header(1, len(head) + len(jpeg) + len(tail)) + head, jpeg, tail


def serialize_example(rec: ImageRecord) -> bytes:
    """One Example as bytes (tests and small tools; the converter streams the parts)."""
    return b"".join(example_parts(rec))


def _masked_crc(crc: int) -> int:
    """TFRecord's CRC masking: rotate right by 15 bits and add a constant."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


class RecordWriter:
    """Writes TFRecord framing around pieces of data to an open binary file (e.g. a GFile)."""

    def __init__(self, file: IO[bytes]):
        self._file = file
        self.records = 0

    def write(self, *pieces: bytes) -> None:
        """Write one record whose data is the concatenation of ``pieces`` (at least one).

        The small header and footer travel with the first and last piece: a file write costs
        a few microseconds whatever its size, the JPEG in the middle is written as it is.
        """
        length = struct.pack("<Q", sum(len(p) for p in pieces))
        crc = 0
        for piece in pieces:
            crc = google_crc32c.extend(crc, piece)
        header = length + struct.pack("<I", _masked_crc(google_crc32c.value(length)))
        footer = struct.pack("<I", _masked_crc(crc))
        if len(pieces) == 1:
            self._file.write(header)
            self._file.write(pieces[0])
            self._file.write(footer)
        else:
            self._file.write(header + pieces[0])
            for piece in pieces[1:-1]:
                self._file.write(piece)
            self._file.write(pieces[-1] + footer)
        self.records += 1
