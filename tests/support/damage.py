"""Test support: damage TFRecord shards as disks, networks and interrupted copies do."""

from __future__ import annotations

import struct

HEADER = 12  # length (8 bytes) and its CRC (4) before each record's data; the data's CRC after


def record_offsets(path: str) -> list[int]:
    """The byte offset of every record of a (sound) TFRecord file."""
    offsets, offset = [], 0
    with open(path, "rb") as f:
        data = f.read()
    while offset < len(data):
        offsets.append(offset)
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        offset += HEADER + length + 4
    return offsets


def truncate(path: str, record: int) -> int:
    """Cut the file in the middle of record ``record`` (as an interrupted copy does); returns
    that record's offset, where a reader stops."""
    offset = record_offsets(path)[record]
    with open(path, "r+b") as f:
        f.truncate(offset + HEADER + 5)
    return offset


def flip_bit(path: str, record: int) -> int:
    """Flip one bit in the data of record ``record`` (its CRC no longer matches); returns that
    record's offset."""
    offset = record_offsets(path)[record]
    with open(path, "r+b") as f:
        f.seek(offset + HEADER + 7)
        byte = f.read(1)[0]
        f.seek(offset + HEADER + 7)
        f.write(bytes([byte ^ 0x04]))
    return offset
