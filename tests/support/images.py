"""Small images with known content and ImageNet's odd files (CMYK, PNG named .JPEG, truncated,
undecodable), made with Pillow; :func:`decode` reads a JPEG back with TensorFlow."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def picture(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    """A small RGB image with structure (so that JPEG sizes and colours are realistic)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) % 256], -1)
    pixels = pixels + rng.normal(0, 10, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def rgb_jpeg(**kw) -> bytes:
    return encode(picture(**kw))


def grey_jpeg(**kw) -> bytes:
    return encode(picture(**kw).convert("L"))


def cmyk_jpeg(**kw) -> bytes:
    return encode(picture(**kw).convert("CMYK"))


def png_bytes(**kw) -> bytes:
    return encode(picture(**kw), "PNG")


def truncated_jpeg(**kw) -> bytes:
    data = rgb_jpeg(**kw)
    return data[: len(data) * 2 // 3]


def undecodable_jpeg(**kw) -> bytes:
    """Complete markers, but the frame header names a quantization table that is not there."""
    data = bytearray(rgb_jpeg(**kw))
    sof = data.index(b"\xff\xc0")
    data[sof + 12] = 3  # FF C0, length, precision, height, width, count, then C, HV, Tq
    return bytes(data)


def decode(jpeg: bytes) -> np.ndarray:
    """The RGB pixels of ``jpeg``, decoded as the input pipeline decodes them."""
    import tensorflow as tf

    return tf.io.decode_jpeg(jpeg, channels=3).numpy()
