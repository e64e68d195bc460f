"""ResNet v1.5: parameter counts, architecture details of the recipe, uint8 in / float32 out."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers

from resnet_imagenet.model.resnet import (
    BN_EPSILON,
    BN_MOMENTUM,
    RGB_MEANS,
    build_resnet,
    weight_decay_variables,
)


def trainable_count(model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


@pytest.fixture(scope="module")
def resnet50():
    return build_resnet(50, 1000, 224)


def test_resnet50_has_the_published_parameter_count(resnet50):
    assert trainable_count(resnet50) == 25_557_032
    # Keras also counts the batch-norm moving statistics.
    assert resnet50.count_params() == 25_610_152


# The torchvision counts, which are ResNet v1.5 too (224x224 input, 1000 classes). The deep
# ones take seconds just to build, hence "slow".
@pytest.mark.parametrize("depth, expected", [
    (18, 11_689_512),
    (34, 21_797_672),
    pytest.param(101, 44_549_160, marks=pytest.mark.slow),
    pytest.param(152, 60_192_808, marks=pytest.mark.slow),
])
def test_every_depth_builds_with_its_known_size(depth, expected):
    assert trainable_count(build_resnet(depth, 1000, None)) == expected


@pytest.mark.slow
def test_resnet200_builds():
    model = build_resnet(200, 10, 32)
    assert model.output_shape == (None, 10)
    assert len([l for l in model.layers if isinstance(l, layers.Add)]) == 3 + 24 + 36 + 3


def test_unknown_depth_is_refused():
    with pytest.raises(ValueError, match="depth"):
        build_resnet(42)


def test_v1_5_puts_the_stride_on_the_3x3_convolution(resnet50):
    for stage in (2, 3, 4):
        block = f"stage{stage}_block1"
        assert resnet50.get_layer(f"{block}_conv1").strides == (1, 1)
        conv2 = resnet50.get_layer(f"{block}_conv2")
        assert conv2.kernel_size == (3, 3) and conv2.strides == (2, 2)
        assert resnet50.get_layer(f"{block}_proj").strides == (2, 2)
    # Stage 1 keeps the resolution (the stem's max-pool has already halved it).
    assert resnet50.get_layer("stage1_block1_conv2").strides == (1, 1)


def test_convolutions_have_no_bias_and_batch_norm_follows_the_recipe(resnet50):
    convs = [l for l in resnet50.layers if isinstance(l, layers.Conv2D)]
    norms = [l for l in resnet50.layers if isinstance(l, layers.BatchNormalization)]
    assert len(convs) == 53 and len(norms) == 53
    assert not any(conv.use_bias for conv in convs)
    assert all(bn.momentum == BN_MOMENTUM == 0.997 for bn in norms)
    assert all(bn.epsilon == BN_EPSILON == 1e-5 for bn in norms)


def test_batch_norm_momentum_and_epsilon_are_settings():
    model = build_resnet(18, 10, 32, bn_momentum=0.9, bn_epsilon=1e-3)
    norms = [l for l in model.layers if isinstance(l, layers.BatchNormalization)]
    assert norms and all((bn.momentum, bn.epsilon) == (0.9, 1e-3) for bn in norms)


def test_zero_init_sets_the_last_gamma_of_each_block_to_zero():
    plain = build_resnet(18, 10, 32)
    zeroed = build_resnet(18, 10, 32, zero_init_residual=True)
    last = [l.name for l in zeroed.layers if l.name.endswith("_bn2") and "block" in l.name]
    assert len(last) == 8
    for name in last:
        assert not np.any(zeroed.get_layer(name).gamma.numpy())
        assert np.all(plain.get_layer(name).gamma.numpy() == 1.0)
    # Only the residual branch's last norm: the first one and the projections start at 1.
    assert np.all(zeroed.get_layer("stage2_block1_bn1").gamma.numpy() == 1.0)
    assert np.all(zeroed.get_layer("stage2_block1_proj_bn").gamma.numpy() == 1.0)


def test_weight_decay_covers_kernels_only(resnet50):
    decayed = weight_decay_variables(resnet50)
    assert len(decayed) == 54  # 53 convolutions + the dense layer
    assert all(v.path.endswith("/kernel") for v in decayed)
    total = sum(int(np.prod(v.shape)) for v in decayed)
    # Everything but BN gammas/betas and the dense bias.
    bn = sum(int(np.prod(v.shape)) for l in resnet50.layers
             if isinstance(l, layers.BatchNormalization) for v in (l.gamma, l.beta))
    assert total == 25_557_032 - bn - 1000


def test_uint8_in_float32_logits_out_even_under_mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_resnet(18, 7, 32)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert model.inputs[0].dtype == "uint8"
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    logits = model(images, training=False)
    assert logits.dtype == "float32" and tuple(logits.shape) == (2, 7)
    assert model.get_layer("stage1_block1_conv1").compute_dtype == "float16"


def test_normalisation_subtracts_the_rgb_means():
    model = build_resnet(18, 10, 4)
    normalize = keras.Model(model.inputs[0], model.get_layer("normalize").output)
    pixel = np.array([124, 117, 104], dtype=np.uint8)
    out = normalize(np.broadcast_to(pixel, (1, 4, 4, 3))).numpy()
    np.testing.assert_allclose(out[0, 0, 0], pixel - np.array(RGB_MEANS), atol=1e-4)
