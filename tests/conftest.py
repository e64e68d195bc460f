"""Shared fixtures. TensorFlow runs for real everywhere; models and images are kept tiny."""

from __future__ import annotations

import os

# Before TensorFlow is imported anywhere: quiet logs, no GPU even where one exists, and no
# thread pools larger than CI's 2 cores.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

pytest_plugins = ["tests.support.gcs", "tests.support.model_dir", "tests.support.cluster"]


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> str:
    """A small demo dataset in the raw ImageNet layout (20 images per class, 10 classes)."""
    from resnet_imagenet.data import sample

    out = str(tmp_path_factory.mktemp("raw") / "raw")
    sample.build(out, seed=0, per_class=20)
    return out


@pytest.fixture
def tf_data_service():
    """An in-process tf.data service (one dispatcher, one worker) on loopback; yields its address."""
    import tensorflow as tf

    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    worker = service.WorkerServer(service.WorkerConfig(
        dispatcher_address=address, worker_address="127.0.0.1:%port%", port=0))
    try:
        yield address
    finally:
        worker._stop()
        dispatcher._stop()
