"""Header-only image checks and the re-encoding of ImageNet's odd files (made here with Pillow)."""

from __future__ import annotations

import numpy as np
import pytest

from resnet_imagenet.data import image_check
from resnet_imagenet.data.image_check import BadImage
from tests.support.images import (cmyk_jpeg, decode, encode, grey_jpeg, picture, png_bytes,
                                  rgb_jpeg, truncated_jpeg, undecodable_jpeg)


def test_plain_rgb_jpeg_is_read_from_its_header_and_kept_byte_for_byte():
    data = rgb_jpeg(width=500, height=375)
    info = image_check.inspect(data)
    assert (info.format, info.width, info.height, info.mode, info.plain) == \
        ("JPEG", 500, 375, "RGB", True)
    jpeg, out = image_check.prepare_jpeg(data)
    assert jpeg is data and out == info


@pytest.mark.parametrize("options", [{"progressive": True}, {"quality": 30, "optimize": True}])
def test_other_jpeg_encodings_are_plain(options):
    info = image_check.inspect(encode(picture(), **options))
    assert (info.width, info.height, info.plain) == (80, 60, True)


def test_bytes_after_the_end_marker_are_accepted():
    data = rgb_jpeg() + b"\x00" * 10 + b"trailer"
    assert image_check.inspect(data).plain


def test_grey_jpeg_stays_as_it_is():
    data = grey_jpeg()
    jpeg, info = image_check.prepare_jpeg(data)
    assert jpeg is data and info.mode == "L" and (info.width, info.height) == (80, 60)


def test_cmyk_jpeg_is_reencoded_as_rgb():
    data = cmyk_jpeg()
    assert image_check.inspect(data).mode == "CMYK"
    jpeg, info = image_check.prepare_jpeg(data)
    assert image_check.inspect(jpeg) == info
    assert (info.mode, info.width, info.height) == ("RGB", 80, 60)
    # The colours survive: compare with the RGB original (CMYK JPEG loses a little).
    original = np.asarray(picture(), np.float32)
    assert np.abs(decode(jpeg).astype(np.float32) - original).mean() < 12


def test_ycck_is_recognised_from_the_adobe_marker():
    data = bytearray(cmyk_jpeg())
    adobe = data.index(b"Adobe")
    data[adobe + 11] = 2  # the Adobe transform flag: 2 = YCCK
    info = image_check.inspect(bytes(data))
    assert info.mode == "YCCK" and info.needs_reencode
    jpeg, out = image_check.prepare_jpeg(bytes(data))
    assert out.mode == "RGB" and decode(jpeg).shape == (60, 80, 3)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF"])
def test_other_formats_saved_as_jpeg_are_reencoded(fmt):
    data = encode(picture(), fmt)
    assert image_check.inspect(data).format == fmt
    jpeg, info = image_check.prepare_jpeg(data)
    assert (info.format, info.mode, info.width, info.height) == ("JPEG", "RGB", 80, 60)
    assert decode(jpeg).shape == (60, 80, 3)


def test_png_with_alpha_loses_the_alpha_channel():
    data = encode(picture().convert("RGBA"), "PNG")
    jpeg, info = image_check.prepare_jpeg(data)
    assert decode(jpeg).shape == (60, 80, 3)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"just some text\n", "not an image"),
    (truncated_jpeg(), "truncated JPEG: no end-of-image marker"),
    (rgb_jpeg()[:200], "truncated JPEG"),
    (rgb_jpeg()[:3], "truncated JPEG"),
    (b"\xff\xd8\x00\x00garbage", "corrupt JPEG"),
    (b"\xff\xd8\xff\xda\x00\x04\x00\x00\xff\xd9", "no frame header"),
    (png_bytes()[:300], "cannot decode PNG"),
    (encode(picture(), "GIF")[:100], "cannot decode GIF"),
])
def test_unusable_files_are_rejected_with_a_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        image_check.prepare_jpeg(data)


def test_zero_height_frame_header_is_rejected():
    data = bytearray(rgb_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = b"\x00\x00"
    with pytest.raises(BadImage, match="size 80x0"):
        image_check.inspect(bytes(data))


def test_decode_validation_catches_what_the_header_cannot():
    data = undecodable_jpeg()
    assert image_check.prepare_jpeg(data)[0] is data  # the header check alone lets it through
    with pytest.raises(BadImage, match="decode failed: .*Invalid JPEG data"):
        image_check.prepare_jpeg(data, decode=True)
    jpeg, info = image_check.prepare_jpeg(rgb_jpeg(), decode=True)
    assert info.plain


def test_decode_validation_catches_a_header_that_lies_about_the_size():
    data = rgb_jpeg()
    with pytest.raises(BadImage, match="decode gives 80x60 but the header says 81x60"):
        image_check.decode_check(data, 81, 60)
