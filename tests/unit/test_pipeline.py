"""Input pipelines on real shards of the demo dataset: shapes, crops, flips, sharding, failures."""

from __future__ import annotations

import collections
import io
import os

import numpy as np
import pytest
import tensorflow as tf

from resnet_imagenet.data import pipeline, preprocessing, tfrecord
from resnet_imagenet.errors import UserError
from tests.support.shards import make_shards

SIZE = 32


@pytest.fixture(scope="module")
def shards(demo_raw, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("shards"))
    return out, make_shards(demo_raw, out, train_shards=4, validation_shards=2)


def records(data_dir: str, split: str) -> list[dict]:
    out = []
    for path in sorted(tf.io.gfile.glob(tfrecord.shard_pattern(data_dir, split))):
        out += tfrecord.read_records(path)
    return out


def jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shard(path: str, serialized: list[bytes]) -> None:
    with tf.io.TFRecordWriter(path) as writer:
        for record in serialized:
            writer.write(record)


def test_train_batches_are_uint8_images_and_zero_based_labels(shards):
    data_dir, counts = shards
    ds = pipeline.train_dataset(tfrecord.shard_pattern(data_dir, "train"), 8, SIZE, seed=1)
    assert ds.element_spec[0].shape.as_list() == [8, SIZE, SIZE, 3]
    labels = []
    for images, batch_labels in ds.take(6):
        assert images.dtype == tf.uint8 and tuple(images.shape) == (8, SIZE, SIZE, 3)
        assert batch_labels.dtype == tf.int32
        labels += batch_labels.numpy().tolist()
    assert set(labels) <= set(range(counts["classes"])) and len(set(labels)) > 3


def test_train_stream_runs_past_the_end_of_an_epoch(shards):
    data_dir, counts = shards
    batches = counts["train"]["images"] // 16 * 3  # three epochs' worth
    ds = pipeline.train_dataset(tfrecord.shard_pattern(data_dir, "train"), 16, SIZE,
                                shuffle_buffer=0)
    assert sum(1 for _ in ds.take(batches)) == batches


def test_crop_window_stays_inside_the_image_and_covers_the_box():
    image = jpeg(np.full((60, 90, 3), 128, np.uint8))
    box = tf.constant([[[0.2, 0.3, 0.6, 0.9]]])  # ymin, xmin, ymax, xmax
    for _ in range(50):
        y, x, h, w = preprocessing.distorted_crop_window(image, box).numpy().tolist()
        assert 0 <= y and 0 <= x and h > 0 and w > 0
        assert y + h <= 60 and x + w <= 90
        overlap_h = max(0, min(y + h, 36) - max(y, 12))
        overlap_w = max(0, min(x + w, 81) - max(x, 27))
        assert overlap_h * overlap_w >= 0.1 * 24 * 54 - 1  # min_object_covered, in pixels


def test_train_flips_left_right_about_half_the_time():
    # Brightness rises from left to right, so any crop keeps the direction unless flipped.
    ramp = np.tile(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], (64, 1, 3))
    image = jpeg(ramp)
    no_boxes = tf.zeros([1, 0, 4])
    directions = []
    for _ in range(40):
        out = preprocessing.preprocess_train(image, no_boxes, SIZE).numpy().astype(int)
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.int64
        directions.append(out[:, -1].mean() > out[:, 0].mean())
    assert 5 <= sum(directions) <= 35, directions


def test_eval_yields_every_image_exactly_once(shards):
    data_dir, counts = shards
    expected = collections.Counter(r["label"] - 1 for r in records(data_dir, "validation"))
    assert sum(expected.values()) == counts["validation"]["images"] == 40
    seen = collections.Counter()
    sizes = []
    for images, labels in pipeline.eval_dataset(
            tfrecord.shard_pattern(data_dir, "validation"), 16, SIZE):
        assert images.dtype == tf.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
        sizes.append(int(labels.shape[0]))
        seen.update(labels.numpy().tolist())
    assert sizes == [16, 16, 8]  # no drop_remainder
    assert seen == expected


def test_eval_is_a_central_crop_of_the_resized_image():
    # Left third red, middle green, right third blue: a central crop keeps only green edges.
    pixels = np.zeros((40, 120, 3), np.uint8)
    pixels[:, :40, 0] = pixels[:, 40:80, 1] = pixels[:, 80:, 2] = 255
    out = preprocessing.preprocess_eval(jpeg(pixels), SIZE).numpy()
    assert out.shape == (SIZE, SIZE, 3)
    centre = out[:, SIZE // 2]
    assert centre[:, 1].mean() > 200 and centre[:, 0].mean() < 40 and centre[:, 2].mean() < 40


def test_shard_files_are_disjoint_and_cover_everything():
    files = [f"train-{i:05d}-of-00010" for i in range(10)]
    parts = [pipeline.shard_files(files, 3, i) for i in range(3)]
    assert sorted(sum(parts, [])) == files
    assert all(not set(a) & set(b) for a in parts for b in parts if a is not b)
    with pytest.raises(UserError, match="at least 4 shards"):
        pipeline.shard_files(files[:3], 4, 0)


@pytest.fixture(scope="module")
def one_class_per_shard(shards, tmp_path_factory) -> str:
    """Train shards where shard k holds only class k: a batch's labels name the files read."""
    data_dir, _ = shards
    by_label = collections.defaultdict(list)
    for path in tf.io.gfile.glob(tfrecord.shard_pattern(data_dir, "train")):
        for raw in tf.data.TFRecordDataset(path):
            label = int(tfrecord.parse_example(raw)["label"])
            by_label[label].append(raw.numpy())
    out = str(tmp_path_factory.mktemp("by-class"))
    for k in range(4):
        write_shard(os.path.join(out, tfrecord.shard_name("train", k, 4)), by_label[k + 1])
    return out


def test_each_worker_reads_its_own_files(one_class_per_shard):
    pattern = tfrecord.shard_pattern(one_class_per_shard, "train")
    seen = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        ds = pipeline.train_dataset(pattern, 4, SIZE, input_context=context, shuffle_buffer=8)
        seen.append({int(label) for _, labels in ds.take(20) for label in labels})
    # Worker 0 has shards 0 and 2 (labels 0 and 2), worker 1 shards 1 and 3.
    assert seen == [{0, 2}, {1, 3}]


def test_eval_shards_per_worker_add_up_to_the_whole(shards):
    data_dir, counts = shards
    pattern = tfrecord.shard_pattern(data_dir, "validation")
    total = 0
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker)
        total += sum(int(labels.shape[0]) for _, labels in
                     pipeline.eval_dataset(pattern, 8, SIZE, input_context=context))
    assert total == counts["validation"]["images"]


def test_epoch_file_order_is_a_function_of_seed_and_epoch():
    files = [f"f{i}" for i in range(7)]
    whole = [f.decode() for f in pipeline.epoch_files(files, seed=3, start_epoch=0)
             .take(21).as_numpy_iterator()]
    resumed = [f.decode() for f in pipeline.epoch_files(files, seed=3, start_epoch=2)
               .take(7).as_numpy_iterator()]
    epochs = [whole[i:i + 7] for i in (0, 7, 14)]
    assert all(sorted(epoch) == files for epoch in epochs)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert resumed == epochs[2]  # a resumed run reads the files in the same order


def test_undecodable_images_are_dropped_and_counted(shards, tmp_path, capfd):
    data_dir, _ = shards
    good = [r for r in tf.data.TFRecordDataset(
        tf.io.gfile.glob(tfrecord.shard_pattern(data_dir, "validation"))).take(5)]
    good = [r.numpy() for r in good]
    broken = [
        tfrecord.encode_example(tfrecord.ImageRecord(
            encoded=b"\xff\xd8\xff\xe0 not really a jpeg", height=10, width=10, label=3,
            synset="n00000002")),
        tfrecord.encode_example(tfrecord.ImageRecord(
            encoded=jpeg(np.zeros((20, 20, 3), np.uint8))[:60], height=20, width=20, label=3,
            synset="n00000002")),
    ]
    write_shard(str(tmp_path / tfrecord.shard_name("validation", 0, 1)),
                good[:2] + broken[:1] + good[2:] + broken[1:])
    write_shard(str(tmp_path / tfrecord.shard_name("train", 0, 1)), good + broken)
    capfd.readouterr()

    labels = [l for _, b in pipeline.eval_dataset(
        tfrecord.shard_pattern(str(tmp_path), "validation"), 4, SIZE) for l in b.numpy()]
    assert len(labels) == 5
    assert capfd.readouterr().err.count("its image does not decode") == 2

    train = pipeline.train_dataset(tfrecord.shard_pattern(str(tmp_path), "train"), 5, SIZE,
                                   shuffle_buffer=0)
    first = next(iter(train))
    assert tuple(first[0].shape) == (5, SIZE, SIZE, 3)
    assert "its image does not decode" in capfd.readouterr().err


def test_no_matching_shards_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no TFRecord shards match") as info:
        pipeline.train_dataset(tfrecord.shard_pattern(str(tmp_path), "train"), 8, SIZE)
    assert "\n" not in str(info.value)


def test_split_size_reads_the_manifest_or_counts(shards, demo_raw, tmp_path):
    data_dir, counts = shards
    assert pipeline.split_size(data_dir) == counts["train"]["images"]
    bare = str(tmp_path / "no-manifest")
    make_shards(demo_raw, bare, train_shards=3, validation_shards=1, manifest=False)
    assert pipeline.split_size(bare) == pipeline.count_records(
        tfrecord.shard_pattern(bare, "train")) == counts["train"]["images"]
    assert pipeline.split_size(bare, "validation") == counts["validation"]["images"]


def test_data_service_serves_the_training_stream(shards, tf_data_service):
    data_dir, _ = shards
    ds = pipeline.train_dataset(tfrecord.shard_pattern(data_dir, "train"), 8, SIZE,
                                data_service=tf_data_service, shuffle_buffer=16)
    batches = list(ds.take(3))
    assert len(batches) == 3
    for images, labels in batches:
        assert images.dtype == tf.uint8 and tuple(images.shape) == (8, SIZE, SIZE, 3)
        assert labels.dtype == tf.int32 and np.all((labels >= 0) & (labels < 10))


def test_bench_input_measures_both_pipelines(shards, capsys):
    data_dir, _ = shards
    result = pipeline.bench_input(data_dir, image_size=SIZE, batch_size=8, batches=3, warmup=1,
                                  shuffle_buffer=16)
    assert result["pipeline_images_per_second"] > 0 and result["baseline_images_per_second"] > 0
    assert result["speedup"] == pytest.approx(
        result["pipeline_images_per_second_per_core"]
        / result["baseline_images_per_second_per_core"], rel=0.02)
    assert result["cores"] >= 1
    out = capsys.readouterr().out
    assert "images/s" in out and "per core" in out and "speedup per core" in out


def stream(pattern: str, batches: int, **kwargs) -> list[tuple[list, list]]:
    """(labels, positions) of the first ``batches`` batches of 16 of a seeded training stream."""
    ds = pipeline.train_dataset(pattern, 16, SIZE, seed=5, shuffle_buffer=40,
                                with_positions=True, **kwargs)
    return [(labels.numpy().tolist(), positions.numpy().tolist())
            for _, labels, positions in ds.take(batches)]


def test_a_resumed_stream_sees_the_batches_of_an_uninterrupted_one(shards):
    data_dir, counts = shards
    pattern = tfrecord.shard_pattern(data_dir, "train")
    per_epoch = counts["train"]["images"]
    batches = per_epoch // 16 + 3  # across the end of the first epoch
    whole = stream(pattern, batches)
    assert whole == stream(pattern, batches)  # the order is a function of the seed
    assert pipeline.split_position(whole[-1][1][-1])[0] == 1
    for k in (3, per_epoch // 16):  # stop after batch k, mid-epoch or near its end
        epoch, index = pipeline.split_position(whole[k - 1][1][-1])
        resumed = stream(pattern, batches - k, start_epoch=epoch, skip=index + 1)
        assert [labels for labels, _ in resumed] == [labels for labels, _ in whole[k:]]
        assert resumed == whole[k:]


def test_a_label_outside_the_classes_stops_the_stream_naming_the_shard(tmp_path, shards):
    data_dir, _ = shards
    serialized = [r.numpy() for r in tf.data.TFRecordDataset(
        sorted(tf.io.gfile.glob(tfrecord.shard_pattern(data_dir, "train")))[:1])]
    bad = tf.train.Example.FromString(serialized[5])
    bad.features.feature["image/class/label"].int64_list.value[:] = [11]
    write_shard(str(tmp_path / "train-00000-of-00001"),
                serialized[:5] + [bad.SerializeToString()] + serialized[6:])
    ds = pipeline.train_dataset(tfrecord.shard_pattern(str(tmp_path), "train"), 4, SIZE,
                                seed=0, num_classes=10)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        for _ in ds.take(len(serialized)):
            pass
    match = pipeline.BAD_LABEL_RE.search(info.value.message)
    assert match.groups() == ("11", "10", str(tmp_path / "train-00000-of-00001"))


def test_the_training_stream_builds_under_a_global_seed_of_zero(tmp_path):
    """``tf.random.set_seed(0)`` (as keras.utils.set_random_seed(0) does) made the per-epoch
    shuffle's tensor seed fail in random_seed.get_seed ("symbolic Tensor as a Python bool")."""
    import tensorflow as tf

    tf.random.set_seed(0)
    try:
        stream = pipeline._training_records([str(tmp_path / "train-00000-of-00001")], seed=0,
                                            start_epoch=0, skip=0, shuffle_buffer=8)
    finally:
        tf.random.set_seed(None)
    assert stream.element_spec[0].dtype == tf.int64
