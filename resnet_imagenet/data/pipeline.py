"""tf.data input pipelines: Inception TFRecord shards -> batches of (uint8 images, int32 labels).

Train, per input pipeline (one per worker under MultiWorkerMirroredStrategy), per epoch:

    this worker's files, reshuffled every epoch (a pure function of seed and epoch)
      -> deterministic interleave of 16 TFRecord readers -> record shuffle buffer (seeded by
         seed and epoch) -> numbered: each record's position is (epoch, index in the epoch)
then -> parallel parse + crop-fused decode + flip + resize  (``preprocessing.preprocess_train``)
     -> label check -> batch (drop_remainder) -> prefetch

The stream never ends (epoch after epoch): every worker can take exactly as many steps as the
others whatever its share of records, which is what the collectives of multi-worker training
require. Its order of examples is a pure function of the seed (every stage is deterministic),
so a resumed run that starts at the epoch and index after the last example it consumed
(``start_epoch``, ``skip``; skipped records are read, not decoded) sees exactly the batches the
uninterrupted run would have seen. The images' random crops and flips are drawn anew.

Workers read disjoint files: with an ``input_context`` (given by
``strategy.distribute_datasets_from_function``) pipeline ``i`` of ``n`` takes files
``i, i+n, i+2n, ...`` of the sorted list, so sharding is explicit and independent of tf.data's
auto-shard heuristics. With ``data_service`` the pipeline runs on tf.data service workers in
``distributed_epoch`` mode instead: the dispatcher hands out the work, every element goes to one
trainer, and no per-worker file sharding is needed.

Records that cannot be read never end a multi-day run: a shard cut short by a truncation or a
corrupt record is read up to the damage (:mod:`~resnet_imagenet.data.bad_records`), and a record
that does not parse or decode is dropped. Records are decoded in small windows; each window's
survivors are compared with its records, and every record skipped is named on stderr (shard and
byte offset) and counted: the training stream carries the counts with its examples, and the
training step all-reduces and bounds them (``--max-bad-records``).
Measured on ImageNet-sized JPEGs, windows cost ~4% of the decoding time; one nested dataset per
record would cost about as much as a decode.

Labels come out as 0..N-1 (the record's 1..N label minus one).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass

import tensorflow as tf

from resnet_imagenet import storage
from resnet_imagenet.data import bad_records, preprocessing, tfrecord
from resnet_imagenet.data import labels as labels_lib
from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
READ_BUFFER_BYTES = bad_records.READ_BUFFER_BYTES
DECODE_WINDOW = 32  # records decoded together (the unit of the failure count)
MAX_EPOCHS = 1 << 40  # "forever": the training loop decides when to stop
DATA_SERVICE_JOB = "resnet-imagenet-train"
READ_CYCLE = 16  # training shards read at once, in turn


def list_files(file_pattern: str) -> list[str]:
    """Sorted shard URIs matching ``file_pattern``; a clear error when there are none."""
    files = storage.glob(file_pattern)
    if not files:
        raise UserError(
            f"no TFRecord shards match {file_pattern}: point --data-dir at the output of "
            "'resnet-imagenet convert' (files named train-00000-of-NNNNN, validation-...)"
        )
    return files


def shard_files(files: list[str], num_pipelines: int, pipeline_id: int) -> list[str]:
    """This input pipeline's files: every ``num_pipelines``-th file, starting at ``pipeline_id``.

    Disjoint across pipelines and covering all files; each pipeline needs at least one file.
    """
    if num_pipelines <= 1:
        return list(files)
    if len(files) < num_pipelines:
        raise UserError(
            f"{len(files)} shard(s) for {num_pipelines} input pipelines (workers): each worker "
            f"reads its own files, so convert with at least {num_pipelines} shards"
        )
    return list(files[pipeline_id::num_pipelines])


def _pipeline_files(file_pattern: str, input_context, sharded: bool) -> list[str]:
    files = list_files(file_pattern)
    if input_context is None or not sharded:
        return files
    return shard_files(files, input_context.num_input_pipelines, input_context.input_pipeline_id)


def epoch_files(files: list[str], seed: int, start_epoch: int = 0) -> tf.data.Dataset:
    """File names epoch after epoch, from ``start_epoch`` on; epoch e's order depends only on
    (seed, e), so a run resumed at epoch e reads the files as the interrupted run would have."""
    files = tf.constant(files)
    return tf.data.Dataset.range(start_epoch, MAX_EPOCHS).flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(_file_order(files, seed, epoch)))


def _file_order(files: tf.Tensor, seed: int, epoch) -> tf.Tensor:
    return tf.random.experimental.stateless_shuffle(
        files, seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]))


# A position in a training stream: epoch << POSITION_BITS | index of the record in the epoch.
POSITION_BITS = 40


def position(epoch: int, index: int) -> int:
    return (epoch << POSITION_BITS) | index


def split_position(value: int) -> tuple[int, int]:
    """(epoch, index in the epoch) of a stream position."""
    return value >> POSITION_BITS, value & ((1 << POSITION_BITS) - 1)


def _read_records(files_ds: tf.data.Dataset, deterministic: bool) -> tf.data.Dataset:
    return files_ds.interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES),
        cycle_length=AUTOTUNE,
        num_parallel_calls=AUTOTUNE,
        deterministic=deterministic,
    )


def _shards(files: list[str]) -> tuple[tf.Tensor, ...]:
    """The shards' names, then what finds those cut short (``bad_records.shard_facts``)."""
    return (tf.constant(files),
            *(tf.constant(facts, tf.int64) for facts in bad_records.shard_facts(files)))


def _training_records(files: list[str], seed: int, start_epoch: int, skip: int,
                      shuffle_buffer: int) -> tf.data.Dataset:
    """``(position, shard path, offset, weight, serialized)`` (``bad_records.shard_records``)
    epoch after epoch, in an order that is a pure function of ``seed`` and of the shards' bytes:
    each epoch's files in their (seed, epoch) order, read ``READ_CYCLE`` at a time (a fixed
    count: AUTOTUNE would depend on the machine), records shuffled within the epoch with a
    (seed, epoch) seed, then numbered. A resumed stream starts at ``start_epoch`` and drops the
    first ``skip`` records of it before anything is decoded.
    """
    shards = _shards(files)
    cycle = min(READ_CYCLE, len(files))

    def one_epoch(epoch):
        order = _file_order(tf.range(len(files)), seed, epoch)
        records = tf.data.Dataset.from_tensor_slices(
            tuple(tf.gather(facts, order) for facts in shards)).interleave(
            bad_records.shard_records, cycle_length=cycle, num_parallel_calls=cycle,
            deterministic=True)
        if shuffle_buffer > 1:
            # A Python seed: a tensor seed (one per epoch) breaks under a global seed of 0
            # (tf.random.set_seed(0): random_seed.get_seed compares the tensor as a bool). The
            # epochs still differ, as each one reads its files in its own (seed, epoch) order.
            records = records.shuffle(shuffle_buffer, seed=seed * 1_000_003 + 1,
                                      reshuffle_each_iteration=False)
        return records.enumerate().map(
            lambda index, record: (tf.bitwise.left_shift(epoch, POSITION_BITS) + index, *record))

    stream = tf.data.Dataset.range(start_epoch, MAX_EPOCHS).flat_map(one_epoch)
    return stream.skip(skip) if skip else stream


def _decode_counting_failures(records: tf.data.Dataset, decode, empty: tuple,
                              deterministic: bool, check=None,
                              registry: bad_records.Registry | None = None) -> tf.data.Dataset:
    """``(id, path, offset, weight, serialized)`` records -> ``(image, label, id, skipped)``:
    the records whose ``decode`` fails are dropped, named and counted.

    ``decode`` takes a record's five components and returns ``(image, label, id, path)``; ids
    are unique in the stream. Records are taken ``DECODE_WINDOW`` at a time. Inside a window,
    ``ignore_errors`` drops the records whose ``decode`` fails and the survivors are batched
    back into one element, padded by ``empty`` (a batch of none) so that a window whose records
    all fail still yields; the ids missing from the survivors are the records skipped (each
    shard's end marker fails too, and counts the records it lost: ``bad_records``). Windows
    are decoded in parallel (the interleave is the pipeline's parallel map). ``check`` sees
    each decoded window ``(images, labels, ids, paths)`` and returns ``(images, labels, ids)``.
    ``skipped`` is the count of records skipped in the window, on its first example (a window
    without one passes its count on to the next), so that the sum over the batches consumed is
    what was lost on the way to them, to a window.
    """

    def decode_window(*window):
        survivors = (
            tf.data.Dataset.from_tensor_slices(window)
            .map(decode)
            .ignore_errors()
            .batch(DECODE_WINDOW)
        )
        decoded = survivors.concatenate(tf.data.Dataset.from_tensors(empty)).take(1)
        return decoded.map(lambda *element: (*element, window[:4]))

    def report(*element):
        *decoded, (ids, paths, offsets, weights) = element
        failed = tf.logical_not(tf.reduce_any(tf.equal(ids[:, None], decoded[2][None, :]), 1))
        skipped = bad_records.report(failed, paths, offsets, weights, registry)
        decoded = check(*decoded) if check else tuple(decoded[:3])
        return (*decoded, skipped)

    def carry(pending, element):
        *decoded, skipped = element
        total = pending + skipped
        count = tf.shape(decoded[0])[0]
        per_example = tf.where(tf.range(count) == 0, total, tf.constant(0, tf.int64))
        return tf.where(count > 0, tf.constant(0, tf.int64), total), (*decoded, per_example)

    return (
        records.batch(DECODE_WINDOW)
        .interleave(decode_window, cycle_length=AUTOTUNE, num_parallel_calls=AUTOTUNE,
                    deterministic=deterministic)
        .map(report)
        .scan(tf.constant(0, tf.int64), carry)
        .unbatch()
    )


# In the error a training record with a bad label raises; training.loop turns it into one line.
BAD_LABEL = "resnet-imagenet: training label out of range"
BAD_LABEL_RE = re.compile(re.escape(BAD_LABEL) + r"\] \[(-?\d+)\] \[(\d+)\] \[(.*?)\]")


def _label_check(num_classes: int):
    """Stops the stream at the first record whose label is not in 1..num_classes (an all-zero
    one-hot would train on nothing, silently): the error names the label and the shard."""

    def check(images, labels, positions, paths):
        bad = tf.logical_or(labels < 0, labels >= num_classes)
        first = tf.argmax(tf.cast(bad, tf.int32))
        if_any = tf.reduce_any(bad)
        label = tf.where(if_any, tf.gather(labels, first) + 1, 0)
        path = tf.where(if_any, tf.gather(paths, first), "")
        tf.debugging.Assert(tf.logical_not(if_any), [BAD_LABEL, label, num_classes, path])
        return images, labels, positions

    def no_check(images, labels, positions, paths):
        return images, labels, positions

    return check if num_classes else no_check


def _train_decoder(image_size: int, min_crop_area: float, random_flip: bool, seed: int):
    area_range = (min_crop_area, preprocessing.AREA_RANGE[1])

    # Plain TF ops, no Python control flow: nothing for AutoGraph to convert (and it
    # mistakes the two nested ``decode`` functions of this module for one another).
    @tf.autograph.experimental.do_not_convert
    def decode(position, path, offset, weight, serialized):
        features = tfrecord.parse_example(serialized)
        image = preprocessing.preprocess_train(features["image"], features["bbox"], image_size,
                                               seed=seed, area_range=area_range,
                                               flip=random_flip)
        return image, features["label"] - 1, position, path

    return decode


def _eval_decoder(image_size: int):
    @tf.autograph.experimental.do_not_convert
    def decode(index, path, offset, weight, serialized):
        features = tfrecord.parse_example(serialized)
        return (preprocessing.preprocess_eval(features["image"], image_size),
                features["label"] - 1, index, path)

    return decode


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    # One thread per element: parallelism comes from the parallel map, not from each op.
    options.threading.max_intra_op_parallelism = 1
    return options


def train_dataset(
    file_pattern: str,
    batch_size: int,
    image_size: int = 224,
    *,
    input_context: tf.distribute.InputContext | None = None,
    shuffle_buffer: int = 10_000,
    seed: int | None = None,
    start_epoch: int = 0,
    skip: int = 0,
    num_classes: int = 0,
    with_positions: bool = False,
    with_skipped: bool = False,
    registry: bad_records.Registry | None = None,
    data_service: str = "",
    data_service_job: str = DATA_SERVICE_JOB,
    min_crop_area: float = preprocessing.AREA_RANGE[0],
    random_flip: bool = True,
) -> tf.data.Dataset:
    """The endless training stream of ``(uint8 [B, S, S, 3], int32 [B])`` batches.

    ``batch_size`` is this pipeline's batch (the per-replica batch when called from
    ``distribute_datasets_from_function``). ``seed`` fixes the order of the examples (None:
    a random one): the same seed gives the same sequence of examples, batch after batch (the
    random crops and flips are drawn anew). ``start_epoch`` and ``skip`` resume a stream: it
    starts at that epoch, past its first ``skip`` records. ``with_positions`` adds a third
    component, int64 ``[B]``, each example's position (:func:`position`): the last one of the
    last batch consumed is where to resume (epoch, index + 1). ``with_skipped`` adds one more,
    int64 ``[B]``: the records skipped (unreadable) on the way to each example, whose sum over
    the batches consumed is the records lost so far (to a decode window of 32 records);
    ``registry`` learns which shards they were in (not with ``data_service``: its workers run
    no Python). ``num_classes`` > 0 stops the
    stream with an error naming the shard at a label outside 1..num_classes.
    ``data_service`` (``grpc://host:port`` or ``host:port`` of a tf.data service dispatcher)
    runs the pipeline on its workers instead, in ``distributed_epoch`` mode (no exact resume);
    every trainer of one run must use the same ``data_service_job`` (and other runs another
    one), so that they share one stream without reading an image twice. ``min_crop_area`` (the
    smallest crop, as a share of the image) and ``random_flip`` default to the recipe.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    files = _pipeline_files(file_pattern, input_context, sharded=not data_service)
    records = _training_records(files, seed, start_epoch, skip, shuffle_buffer)
    empty = (tf.zeros([0, image_size, image_size, 3], tf.uint8), tf.zeros([0], tf.int32),
             tf.zeros([0], tf.int64), tf.zeros([0], tf.string))
    ds = _decode_counting_failures(
        records, _train_decoder(image_size, min_crop_area, random_flip, seed), empty,
        deterministic=True, check=_label_check(num_classes),
        registry=None if data_service else registry)
    if not (with_positions and with_skipped):
        ds = ds.map(lambda images, labels, positions, skipped: (
            images, labels, *((positions,) if with_positions else ()),
            *((skipped,) if with_skipped else ())))
    ds = ds.batch(batch_size, drop_remainder=True)
    if data_service:
        # distributed_epoch splits the source (the epoch range) over the service workers, so
        # each worker produces whole epochs and every trainer consuming the shared job gets
        # distinct batches.
        ds = ds.apply(tf.data.experimental.service.distribute(
            processing_mode="distributed_epoch",
            service=data_service if "://" in data_service else f"grpc://{data_service}",
            job_name=data_service_job,
        ))
    return ds.prefetch(AUTOTUNE).with_options(_options(deterministic=True))


def eval_dataset(
    file_pattern: str,
    batch_size: int,
    image_size: int = 224,
    *,
    input_context: tf.distribute.InputContext | None = None,
    registry: bad_records.Registry | None = None,
) -> tf.data.Dataset:
    """Every readable image of the matching shards exactly once, in ``(uint8 [b, S, S, 3],
    int32 [b])``.

    The last batch may be smaller than ``batch_size`` (no image is left out). With an
    ``input_context`` each pipeline gets its own files, as in training. Records that cannot be
    read are skipped, named on stderr and added to ``registry``.
    """
    files = _pipeline_files(file_pattern, input_context, sharded=True)
    records = tf.data.Dataset.from_tensor_slices(_shards(files)).interleave(
        bad_records.shard_records, cycle_length=AUTOTUNE, num_parallel_calls=AUTOTUNE,
        deterministic=True)
    records = records.enumerate().map(lambda index, record: (index, *record))
    empty = (tf.zeros([0, image_size, image_size, 3], tf.uint8), tf.zeros([0], tf.int32),
             tf.zeros([0], tf.int64), tf.zeros([0], tf.string))
    ds = _decode_counting_failures(records, _eval_decoder(image_size), empty,
                                   deterministic=True, registry=registry)
    ds = ds.map(lambda images, labels, index, skipped: (images, labels))
    return ds.batch(batch_size).prefetch(AUTOTUNE).with_options(_options(deterministic=True))


def count_records(file_pattern: str) -> int:
    """Number of records in the matching files, by reading them once (no parsing); a shard cut
    short counts the records read before the cut and the estimate of those after it."""
    ds = tf.data.Dataset.from_tensor_slices(_shards(list_files(file_pattern))).interleave(
        bad_records.shard_records, cycle_length=AUTOTUNE, num_parallel_calls=AUTOTUNE,
        deterministic=False,
    )
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, record: n + tf.abs(record[2])))


def split_size(data_dir: str, split: str = "train") -> int:
    """Images in one split: ``manifest.json`` when the converter wrote one, else a count.

    Shards made by the original Inception script come without a manifest; counting reads the
    split once, which for ImageNet's train split is 140 GB -- hence the log line.
    """
    manifest = storage.join(data_dir, labels_lib.MANIFEST)
    if storage.exists(manifest):
        try:
            return int(json.loads(storage.read_text(manifest))[split]["images"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s has no %s image count; counting the records instead", manifest, split)
    log.info("counting the %s records under %s once (no manifest.json there)", split, data_dir)
    return count_records(tfrecord.shard_pattern(data_dir, split))


# --- `resnet-imagenet bench input` -----------------------------------------------------------


def _baseline_decoder(image_size: int):
    """The reference algorithm: decode the whole JPEG, then crop, flip, resize and subtract the
    mean in float32, all on the CPU."""
    from resnet_imagenet.model.resnet import RGB_MEANS

    means = tf.constant(RGB_MEANS, tf.float32)

    def decode(serialized):
        features = tfrecord.parse_example(serialized)
        image = tf.io.decode_jpeg(features["image"], channels=3)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), bounding_boxes=features["bbox"],
            min_object_covered=preprocessing.MIN_OBJECT_COVERED,
            aspect_ratio_range=preprocessing.ASPECT_RATIO_RANGE,
            area_range=preprocessing.AREA_RANGE,
            max_attempts=preprocessing.MAX_ATTEMPTS,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.random_flip_left_right(image)
        image = tf.image.resize(image, [image_size, image_size], method="bilinear")
        return image - means, features["label"] - 1

    return decode


def _baseline_dataset(file_pattern: str, batch_size: int, image_size: int,
                      shuffle_buffer: int) -> tf.data.Dataset:
    files = tf.data.Dataset.from_tensor_slices(list_files(file_pattern)).repeat()
    records = _read_records(files, deterministic=False).shuffle(shuffle_buffer)
    ds = records.map(_baseline_decoder(image_size), num_parallel_calls=AUTOTUNE,
                     deterministic=False)
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE).with_options(
        _options(deterministic=False))


@dataclass
class _Throughput:
    images: int
    seconds: float  # wall clock
    cpu_seconds: float  # every thread of this process

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def images_per_core_second(self) -> float:
        return self.images / self.cpu_seconds


def _measure(ds: tf.data.Dataset, batches: int, warmup: int) -> _Throughput:
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    start, start_cpu = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(batches):
        batch, _labels = next(iterator)
        images += int(batch.shape[0])
    return _Throughput(images, time.perf_counter() - start, time.process_time() - start_cpu)


def available_cores() -> int:
    """CPU cores this process may run on (the cgroup/affinity view, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def bench_input(data_dir: str, image_size: int = 224, batch_size: int = 64, batches: int = 50,
                warmup: int = 5, shuffle_buffer: int = 1000) -> dict:
    """Images/s of :func:`train_dataset` and of the reference algorithm on the same shards.

    Both run in this process one after the other, over the same train shards, with the same
    reader, shuffle and tf.data parallelism (AUTOTUNE over every core); only the per-image work
    differs. "Per core" is images per CPU-second of this process (all its threads), which
    holds even when other processes share the machine; it sizes the CPUs to request per GPU
    (a ResNet-50 step on an H100 consumes some 3,000 images/s). The speedup compares per-core
    figures.
    """
    pattern = tfrecord.shard_pattern(data_dir, "train")
    list_files(pattern)  # a clear error before anything runs
    ours = _measure(train_dataset(pattern, batch_size, image_size, shuffle_buffer=shuffle_buffer),
                    batches, warmup)
    base = _measure(_baseline_dataset(pattern, batch_size, image_size, shuffle_buffer),
                    batches, warmup)
    result = {
        "data_dir": data_dir,
        "image_size": image_size,
        "batch_size": batch_size,
        "batches": batches,
        "cores": available_cores(),
        "pipeline_images_per_second": round(ours.images_per_second, 1),
        "baseline_images_per_second": round(base.images_per_second, 1),
        "pipeline_images_per_second_per_core": round(ours.images_per_core_second, 1),
        "baseline_images_per_second_per_core": round(base.images_per_core_second, 1),
        "speedup": round(ours.images_per_core_second / base.images_per_core_second, 2),
    }
    print(f"input pipeline  {result['pipeline_images_per_second']:>9.1f} images/s  "
          f"{result['pipeline_images_per_second_per_core']:>8.1f} per core")
    print(f"reference       {result['baseline_images_per_second']:>9.1f} images/s  "
          f"{result['baseline_images_per_second_per_core']:>8.1f} per core")
    print(f"speedup per core {result['speedup']:>8.2f}x  ({result['cores']} cores available; "
          "uint8 out, crop fused with decoding)")
    return result
