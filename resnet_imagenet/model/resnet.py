"""ResNet v1.5 in Keras 3 layers: depths 18, 34, 50, 101, 152, 200, ``channels_last``.

    model = build_resnet(50, num_classes=1000, image_size=224)   # uint8 [batch, 224, 224, 3]
    weight_decay_variables(model)                                 # the kernels L2 applies to

v1.5: a bottleneck block's stride is on its 3x3 convolution. Convolutions that feed a batch norm
have no bias; BN uses momentum 0.997 and epsilon 1e-5 unless told otherwise. Strided
convolutions pad explicitly and symmetrically. The model takes **uint8** images and normalises
them itself (the recipe's RGB mean subtraction); logits are float32 even under a mixed-precision
policy. docs/training.md says why.

The model never reads files: the training loop, evaluation and export build it from the
``model`` settings of :class:`~resnet_imagenet.config.TrainConfig` and restore weights
themselves.
"""

from __future__ import annotations

import keras
from keras import layers

# Per-channel RGB means of ImageNet (0..255), as in the reference recipe.
RGB_MEANS = (123.68, 116.78, 103.94)
BN_MOMENTUM = 0.997
BN_EPSILON = 1e-5

# depth -> (block kind, blocks per stage)
BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
STAGE_FILTERS = (64, 128, 256, 512)


def _kernel_init():
    # He initialisation over fan-out, as in the reference implementations of ResNet.
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def _conv(x, filters: int, kernel: int, stride: int, name: str):
    if stride > 1 and kernel > 1:
        pad = (kernel - 1) // 2
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return layers.Conv2D(
        filters, kernel, strides=stride, padding=padding, use_bias=False,
        kernel_initializer=_kernel_init(), name=name,
    )(x)


def _bn(x, name: str, zero_gamma: bool = False, momentum: float = BN_MOMENTUM,
        epsilon: float = BN_EPSILON):
    return layers.BatchNormalization(
        momentum=momentum, epsilon=epsilon,
        gamma_initializer="zeros" if zero_gamma else "ones", name=name,
    )(x)


def _shortcut(x, filters: int, stride: int, name: str, bn):
    if stride == 1 and x.shape[-1] == filters:
        return x
    x = _conv(x, filters, 1, stride, f"{name}_proj")
    return bn(x, f"{name}_proj_bn")


def _basic_block(x, filters: int, stride: int, name: str, zero_init: bool, bn=_bn):
    shortcut = _shortcut(x, filters, stride, name, bn)
    y = _conv(x, filters, 3, stride, f"{name}_conv1")
    y = layers.ReLU(name=f"{name}_relu1")(bn(y, f"{name}_bn1"))
    y = _conv(y, filters, 3, 1, f"{name}_conv2")
    y = bn(y, f"{name}_bn2", zero_gamma=zero_init)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


def _bottleneck_block(x, filters: int, stride: int, name: str, zero_init: bool, bn=_bn):
    shortcut = _shortcut(x, 4 * filters, stride, name, bn)
    y = _conv(x, filters, 1, 1, f"{name}_conv1")
    y = layers.ReLU(name=f"{name}_relu1")(bn(y, f"{name}_bn1"))
    y = _conv(y, filters, 3, stride, f"{name}_conv2")  # v1.5: the stride is here
    y = layers.ReLU(name=f"{name}_relu2")(bn(y, f"{name}_bn2"))
    y = _conv(y, 4 * filters, 1, 1, f"{name}_conv3")
    y = bn(y, f"{name}_bn3", zero_gamma=zero_init)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


@keras.saving.register_keras_serializable(package="resnet_imagenet")
class Normalize(layers.Layer):
    """uint8 RGB -> mean-subtracted values in the layer's compute dtype (float16/bfloat16 too)."""

    def __init__(self, means=RGB_MEANS, **kwargs):
        super().__init__(**kwargs)
        self.means = tuple(float(m) for m in means)

    def call(self, images):
        x = keras.ops.cast(images, self.compute_dtype)
        return x - keras.ops.cast(keras.ops.convert_to_tensor(self.means), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "means": self.means}


def build_resnet(
    depth: int = 50,
    num_classes: int = 1000,
    image_size: int | None = None,
    zero_init_residual: bool = False,
    name: str | None = None,
    bn_momentum: float = BN_MOMENTUM,
    bn_epsilon: float = BN_EPSILON,
) -> keras.Model:
    """A ResNet v1.5 taking uint8 ``[B, H, W, 3]`` and returning float32 logits ``[B, classes]``.

    ``image_size`` fixes H = W in the input signature; None accepts any size (the network is
    fully convolutional up to the global pooling). ``bn_momentum``/``bn_epsilon`` configure
    every batch norm. The dtype policy in force
    (``keras.mixed_precision.set_global_policy``) applies to every layer but the logits.
    """
    if depth not in BLOCKS:
        raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS)}, not {depth}")
    kind, stages = BLOCKS[depth]
    block = _bottleneck_block if kind == "bottleneck" else _basic_block

    def bn(x, name, zero_gamma=False):
        return _bn(x, name, zero_gamma, momentum=bn_momentum, epsilon=bn_epsilon)

    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="images")
    x = Normalize(name="normalize")(inputs)
    x = _conv(x, 64, 7, 2, "stem_conv")
    x = layers.ReLU(name="stem_relu")(bn(x, "stem_bn"))
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    for stage, (filters, blocks) in enumerate(zip(STAGE_FILTERS, stages), start=1):
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 1) else 1
            x = block(x, filters, stride, f"stage{stage}_block{b + 1}", zero_init_residual, bn)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        dtype="float32",
        name="logits",
    )(x)
    return keras.Model(inputs, logits, name=name or f"resnet{depth}_v1_5")


def weight_decay_variables(model: keras.Model) -> list:
    """The kernels that L2 weight decay applies to: convolutions and dense layers only.

    Batch-norm scales and offsets and the dense bias are excluded, as in the reference recipe.
    """
    return [layer.kernel for layer in model.layers
            if isinstance(layer, (layers.Conv2D, layers.Dense))]
