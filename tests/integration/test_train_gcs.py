"""Training with shards and the model directory on gs:// (the fake-gcs-server emulator).

TensorFlow's own GCS client does every read and write: shards through tf.data, checkpoints
through CheckpointManager, TensorBoard events through tf.summary, JSON through storage.py.
The objects are then checked with google-cloud-storage, independently of TensorFlow.
"""

from __future__ import annotations

import json

import pytest

from resnet_imagenet import storage
from resnet_imagenet.config import TrainConfig
from resnet_imagenet.errors import UserError
from resnet_imagenet.training import loop
from tests.support.gcs import gcs_client
from tests.support.shards import make_shards

pytestmark = pytest.mark.gcs


def objects(uri: str) -> set[str]:
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    return {blob.name[len(prefix) + 1:]
            for blob in gcs_client().list_blobs(bucket, prefix=prefix + "/")}


def test_train_and_resume_on_gcs(demo_raw, tmp_path, gcs_bucket):
    local = str(tmp_path / "tfrecords")
    make_shards(demo_raw, local, train_shards=2, validation_shards=1)
    data_dir, model_dir = f"{gcs_bucket}/tfrecords", f"{gcs_bucket}/runs/1/model"
    storage.copy_tree(local, data_dir)

    config = TrainConfig().updated(data_dir=data_dir, model_dir=model_dir, resnet_size=18,
                                   image_size=32, num_classes=10, batch_size=8, train_steps=2,
                                   checkpoint_every=1, log_every=1, shuffle_buffer=32)
    first = loop.train(config)
    assert first["checkpoint"] == f"{model_dir}/checkpoints/ckpt-2"

    written = objects(model_dir)
    assert {"config.json", "labels.json", "train_summary.json", "checkpoints/checkpoint",
            "checkpoints/ckpt-1.index", "checkpoints/ckpt-2.index"} <= written
    assert any(name.startswith("logs/train/events.out.tfevents.") for name in written)
    assert any(name.startswith("logs/validation/events.out.tfevents.") for name in written)
    assert not [name for name in written if storage.is_temp(name)]
    summary = json.loads(storage.read_text(f"{model_dir}/train_summary.json"))
    assert summary["step"] == 2 and summary["validation"]["images"] == 40

    second = loop.train(config.updated(train_steps=3))
    assert (second["resumed_from"], second["start_step"], second["step"]) == (
        f"{model_dir}/checkpoints/ckpt-2", 2, 3)
    assert "checkpoints/ckpt-3.index" in objects(model_dir)


def test_no_shards_in_the_bucket(gcs_bucket):
    with pytest.raises(UserError, match=f"no TFRecord shards match {gcs_bucket}/nothing/"):
        loop.train(TrainConfig().updated(data_dir=f"{gcs_bucket}/nothing",
                                         model_dir=f"{gcs_bucket}/m"))
