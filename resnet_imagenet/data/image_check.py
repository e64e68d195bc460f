"""Recognise an image from its header, without decoding it, and repair ImageNet's odd files.

Decoding a ~500x375 JPEG costs ~1.5 ms; reading its header costs microseconds. The converter
therefore checks every file from its bytes alone:

* JPEG: start-of-image marker, a frame header (SOF: size, precision, components) before the first
  scan, and an end-of-image marker after it. A file cut short in transfer loses its EOI marker,
  so truncation is caught without decoding; the entropy-coded data cannot contain ``FF D9``
  (a literal ``FF`` in it is stuffed as ``FF 00``), so an EOI after the first scan is the real one.
* Other formats (PNG, GIF, BMP, TIFF, WebP) are recognised by their signature. ILSVRC2012 has a
  PNG saved as ``.JPEG``; such files are decoded with Pillow and re-encoded as RGB JPEG, which
  also proves they are complete.
* CMYK and YCCK JPEGs (22 of them in ILSVRC2012 train) are re-encoded as RGB JPEG, as the
  Inception script did, because decoders disagree on them; greyscale JPEGs are kept as they are
  (the readers decode with ``channels=3``).

Everything is found from the bytes, not from lists of known file names.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

# Frame headers (SOF) of the processes libjpeg(-turbo) decodes as 8-bit sequential/progressive
# Huffman images: the ones TensorFlow's decode_jpeg handles, so they are kept as they are.
_PLAIN_SOF = {0xC0, 0xC1, 0xC2}
# Every SOF marker: C0..CF except DHT (C4), JPG (C8) and DAC (CC).
_ALL_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers.
_STANDALONE = {0x01} | set(range(0xD0, 0xD8))
_SOI, _EOI, _SOS, _APP14 = 0xD8, 0xD9, 0xDA, 0xEE

# Signatures of the formats Pillow can turn into an RGB JPEG.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

REENCODE_QUALITY = 100  # as the Inception script: re-encoding must not lose more than it must


class BadImage(Exception):
    """The file cannot become an Example; ``str(exc)`` is the reason written to the manifest."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says. ``mode`` is Pillow's name: "RGB", "L", "CMYK", "YCCK", ..."""

    format: str
    width: int = 0
    height: int = 0
    mode: str = ""
    plain: bool = False  # a JPEG that the readers take as it is (RGB or grey, 8-bit, Huffman)

    @property
    def needs_reencode(self) -> bool:
        return not self.plain


def inspect(data: bytes) -> ImageInfo:
    """Identify ``data`` from its header; raise :class:`BadImage` for anything unusable.

    For a JPEG the size and colour mode come from the frame header and the file must be
    complete (SOI, SOF, SOS, EOI). Other formats are only recognised here: their size and
    completeness are established when :func:`to_rgb_jpeg` decodes them.
    """
    if not data:
        raise BadImage("empty file")
    if data[:2] == b"\xff\xd8":
        return _inspect_jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageInfo("WEBP")
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return ImageInfo(name)
    raise BadImage("not an image: unrecognised header")


def _inspect_jpeg(data: bytes) -> ImageInfo:
    n = len(data)
    pos = 2
    frame = None  # (marker, precision, height, width, components)
    adobe_transform = None
    while True:
        if pos >= n:
            raise BadImage("truncated JPEG: no image data")
        if data[pos] != 0xFF:
            raise BadImage(f"corrupt JPEG: no marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede any marker
            pos += 1
        if pos >= n:
            raise BadImage("truncated JPEG: no image data")
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (_SOI, _EOI):
            raise BadImage("corrupt JPEG: image ends before its data")
        if pos + 2 > n:
            raise BadImage("truncated JPEG: header cut short")
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2 or pos + length > n:
            raise BadImage("truncated JPEG: header cut short")
        if marker == _SOS:
            if frame is None:
                raise BadImage("corrupt JPEG: no frame header before the image data")
            break
        segment = data[pos + 2:pos + length]
        if marker in _ALL_SOF:
            if len(segment) < 6:
                raise BadImage("corrupt JPEG: short frame header")
            frame = (marker, segment[0], int.from_bytes(segment[1:3], "big"),
                     int.from_bytes(segment[3:5], "big"), segment[5])
        elif marker == _APP14 and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        pos += length
    # EOI must follow the first scan. Checking the very end first keeps the common case O(1);
    # rfind also accepts files with bytes appended after EOI, which decoders ignore.
    if not data.endswith(b"\xff\xd9") and data.rfind(b"\xff\xd9", pos) < 0:
        raise BadImage("truncated JPEG: no end-of-image marker")
    marker, precision, height, width, components = frame
    if height == 0 or width == 0:
        raise BadImage(f"unsupported JPEG: frame header gives size {width}x{height}")
    if components == 1:
        mode = "L"
    elif components == 3:
        mode = "RGB"
    elif components == 4:
        mode = "YCCK" if adobe_transform == 2 else "CMYK"
    else:
        raise BadImage(f"unsupported JPEG: {components} colour components")
    plain = mode in ("RGB", "L") and marker in _PLAIN_SOF and precision == 8
    return ImageInfo("JPEG", width, height, mode, plain)


def to_rgb_jpeg(data: bytes, info: ImageInfo) -> tuple[bytes, int, int]:
    """Decode with Pillow and re-encode as an RGB JPEG; returns (bytes, width, height).

    Decoding the whole image is what proves a non-JPEG file complete, so a truncated PNG ends
    here as :class:`BadImage`. Transparency is dropped, as TensorFlow's ``channels=3`` does.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"cannot decode {info.format} {info.mode}".rstrip() + f": {exc}") from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue(), rgb.width, rgb.height


def decode_check(data: bytes, width: int, height: int) -> None:
    """Fully decode a JPEG with TensorFlow, the decoder training uses (``--validate decode``).

    Catches what a header cannot: tables or data the decoder rejects, and a header whose size
    lies. (libjpeg tolerates some damage, e.g. a scan cut short before an EOI marker, filling
    the missing rows; training would read such a file too, so it is kept.)
    """
    import tensorflow as tf

    try:
        shape = tf.io.decode_jpeg(data, channels=3).shape
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as exc:
        # Eager errors read "{{function_node ...}} <message> [Op:DecodeJpeg]": keep the message.
        message = re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:\w+\]$", "", exc.message.strip())
        first_line = message.splitlines()[0] if message else type(exc).__name__
        raise BadImage(f"decode failed: {first_line}") from None
    if (shape[1], shape[0]) != (width, height):
        raise BadImage(f"decode gives {shape[1]}x{shape[0]} but the header says {width}x{height}")


def prepare_jpeg(data: bytes, decode: bool = False) -> tuple[bytes, ImageInfo]:
    """The JPEG to store for ``data`` and what it is (size, "RGB" or "L"); or :class:`BadImage`.

    Plain RGB and grey JPEGs are kept byte for byte; anything else recognisable is re-encoded.
    ``decode`` adds a full decode (``--validate decode``).
    """
    info = inspect(data)
    if info.needs_reencode:
        data, width, height = to_rgb_jpeg(data, info)
        info = ImageInfo("JPEG", width, height, "RGB", plain=True)
    if decode:
        decode_check(data, info.width, info.height)
    return data, info
