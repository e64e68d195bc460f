"""Train and eval image transforms: TensorFlow ops, JPEG bytes in, uint8 out.

Train (the Inception recipe, made cheap): ``tf.image.sample_distorted_bounding_box`` picks a crop
over the record's boxes, and ``tf.image.decode_and_crop_jpeg`` decodes *only* that window --
the reference decoded the whole image, then cropped, which costs up to 20x more pixels for a 5%
crop. Then a random left-right flip and a resize to ``image_size``.

Eval: decode, resize the shorter side to ``image_size / 0.875`` (256 for 224), central crop.

Both return uint8 ``[image_size, image_size, 3]``. Mean subtraction and the cast to float happen
inside the model, on the accelerator (see ``model.resnet.Normalize``).
"""

from __future__ import annotations

import tensorflow as tf

EVAL_CROP_FRACTION = 0.875
MIN_OBJECT_COVERED = 0.1
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
AREA_RANGE = (0.05, 1.0)
MAX_ATTEMPTS = 100


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def distorted_crop_window(image_bytes: tf.Tensor, bbox: tf.Tensor, seed=None,
                          area_range=AREA_RANGE) -> tf.Tensor:
    """The Inception crop as a ``[y, x, height, width]`` window of the encoded JPEG.

    ``bbox`` is float32 ``[1, n, 4]`` of (ymin, xmin, ymax, xmax) in [0, 1]; with n == 0 the
    whole image stands in for the box. ``area_range`` bounds the crop's share of the image.
    """
    shape = tf.image.extract_jpeg_shape(image_bytes)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape,
        bounding_boxes=bbox,
        seed=seed,
        min_object_covered=MIN_OBJECT_COVERED,
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=area_range,
        max_attempts=MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    return tf.stack([offset_y, offset_x, height, width])


def preprocess_train(image_bytes: tf.Tensor, bbox: tf.Tensor, image_size: int = 224,
                     seed=None, area_range=AREA_RANGE, flip: bool = True) -> tf.Tensor:
    """Distorted-box crop fused with JPEG decoding, random flip, resize: uint8 [S, S, 3].

    ``area_range`` and ``flip`` default to the recipe; milder crops and no flip suit datasets
    whose classes are not mirror-invariant or whose objects fill the frame (the digits demo).
    ``seed`` (an int) seeds the crop, and ``seed + 1`` the flip, so the two draw independently.
    """
    window = distorted_crop_window(image_bytes, bbox, seed=seed, area_range=area_range)
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    if flip:
        image = tf.image.random_flip_left_right(image, seed=None if seed is None else seed + 1)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return _to_uint8(image)


def eval_resize_size(image_size: int) -> int:
    """The shorter side before the central crop: 256 for 224."""
    return int(round(image_size / EVAL_CROP_FRACTION))


def resize_and_central_crop(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [H, W, 3] of any size -> uint8 [S, S, 3]: shorter side to S/0.875, central crop."""
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.cast(eval_resize_size(image_size), tf.float32) / tf.minimum(height, width)
    new_height = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), image_size)
    new_width = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), image_size)
    resized = tf.image.resize(image, [new_height, new_width], method="bilinear")
    top = (new_height - image_size) // 2
    left = (new_width - image_size) // 2
    cropped = tf.slice(resized, [top, left, 0], [image_size, image_size, 3])
    return _to_uint8(cropped)


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """JPEG, PNG, GIF (first frame) or BMP bytes -> uint8 [H, W, 3]; grey becomes RGB."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def preprocess_eval(image_bytes: tf.Tensor, image_size: int = 224) -> tf.Tensor:
    """Decode, resize shorter side to ``image_size / 0.875``, central crop: uint8 [S, S, 3]."""
    return resize_and_central_crop(decode_image(image_bytes), image_size)


def preprocess_eval_batch(image_bytes: tf.Tensor, image_size: int = 224) -> tf.Tensor:
    """A batch of encoded images (string ``[B]``) -> uint8 ``[B, S, S, 3]`` (serving graphs)."""
    return tf.map_fn(
        lambda b: preprocess_eval(b, image_size),
        image_bytes,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
    )
