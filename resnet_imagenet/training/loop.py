"""The custom training loop: one code path for one CPU, several GPUs and many workers.

Why a custom loop: Keras 3's ``model.fit`` does not work under MultiWorkerMirroredStrategy
(keras-team/keras#20585), and a loop of our own makes the recipe explicit -- per-replica loss
scaled by the global batch, L2 on kernels only, loss scaling, what is checkpointed.

One step (``strategy.run`` inside a ``tf.function``), per replica:

    logits = model(uint8 images)                       # normalisation happens inside
    ce     = sum(softmax CE with label smoothing) / global batch
    l2     = weight_decay * sum(l2_loss(conv/dense kernels)) / replicas
    grads  = d(ce + l2)/dw   (scaled and unscaled under mixed_float16)
    optimizer.apply(grads)   # Keras all-reduces (sums) the gradients across replicas

so the summed gradient is exactly that of the global-batch loss. The forward/backward pass is
XLA-compiled when ``jit_compile`` is on; the all-reduce and the update stay outside XLA, which
cannot compile MultiWorkerMirroredStrategy's collectives.

Each step also all-reduces a small vector: loss, cross-entropy, L2, correct predictions and a
"stop" flag. The flag is how SIGTERM is handled: a worker that receives it (a preempted pod)
raises its flag; after that step every worker sees the sum, all save a checkpoint at the same
step and exit with :data:`RETRYABLE_EXIT_CODE`, which the training operator's ``ExitCode``
restart policy treats as retryable. At most the step in flight is lost. Saving needs every
worker, so no worker can save alone -- hence the agreement through the all-reduce rather than a
local handler that saves at once.

A worker that vanishes without warning (SIGKILL, a lost node) makes the others' collectives fail
within seconds; they exit with the same retryable code, and the restarted job resumes from the
last periodic checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import threading
import time

from resnet_imagenet import config as config_lib
from resnet_imagenet import storage
from resnet_imagenet.config import TrainConfig
from resnet_imagenet.data import labels as labels_lib
from resnet_imagenet.data import pipeline, tfrecord
from resnet_imagenet.errors import UserError
from resnet_imagenet.training import checkpoints, schedules, strategy as strategy_lib
from resnet_imagenet.training.summaries import Summaries

log = logging.getLogger(__name__)

# 128 + SIGTERM. restartPolicy: ExitCode restarts pods that exit with 128..255 and fails the
# job on 1..127 (the UserError status 2 included: bad input does not get better by retrying).
RETRYABLE_EXIT_CODE = 143
SUMMARY_FILE = "train_summary.json"
_METRICS = ("loss", "cross_entropy", "l2", "correct", "stop")


class RestartRequired(Exception):
    """Training stopped in a way that a restart of the job resumes from (exit 143)."""


class Preempted(RestartRequired):
    """Training stopped on SIGTERM after saving ``checkpoint`` at ``step``; rerun to resume."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"stopped by SIGTERM at step {step} after saving {checkpoint}; "
                         "run the same command again to resume")
        self.step = step
        self.checkpoint = checkpoint


class PeerLost(RestartRequired):
    """A collective failed: another worker is gone. Restarting all workers resumes."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: the run cannot continue as configured."""


class _StopSignal:
    """Set by SIGTERM, read by the loop once per step. Python signal handlers can only be
    installed from the main thread; elsewhere (an embedding application) SIGTERM is left alone."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, _frame):
        if not self.requested:
            log.warning("received %s: saving a checkpoint at the next step boundary",
                        signal.Signals(signum).name)
        self.requested = True

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def resolve_precision(setting: str, gpus: list) -> str:
    """The Keras dtype policy for ``--mixed-precision``: auto = on with GPUs, off on CPU.

    With GPUs, auto picks bfloat16 when every GPU supports it well (compute capability 8.0,
    Ampere, and newer: no loss scaling needed), float16 with loss scaling otherwise.
    """
    if setting == "off" or (setting == "auto" and not gpus):
        return "float32"
    if setting == "auto":
        import tensorflow as tf

        capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability",
                                                                           (0, 0)) for g in gpus]
        setting = "bfloat16" if all(c >= (8, 0) for c in capabilities) else "float16"
    return f"mixed_{setting}"


def resolve_jit(setting: str, gpus: list) -> bool:
    return setting == "on" or (setting == "auto" and bool(gpus))


def _check_model_dir(config: TrainConfig) -> None:
    """Refuse a model directory that holds another model (before anything is written)."""
    path = storage.join(config.model_dir, "config.json")
    if not storage.exists(path):
        return
    previous = config_lib.load(config.model_dir)
    for name in ("resnet_size", "num_classes"):
        if getattr(previous, name) != getattr(config, name):
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"--model-dir {config.model_dir} holds a model trained with {flag} "
                f"{getattr(previous, name)}, not {getattr(config, name)}: use a new --model-dir "
                "or the same setting"
            )


def _check_classes(config: TrainConfig) -> None:
    label_map = labels_lib.from_data_dir(config.data_dir)
    if label_map is None:
        return
    if len(label_map) > config.num_classes:
        raise UserError(
            f"{config.data_dir} has {len(label_map)} classes but --num-classes is "
            f"{config.num_classes}: pass --num-classes {len(label_map)}"
        )
    if len(label_map) < config.num_classes:
        log.warning("%s has %d classes; the model has %d outputs (--num-classes)",
                    config.data_dir, len(label_map), config.num_classes)


def _check_batch(batch_size: int, replicas: int) -> None:
    if batch_size % replicas:
        raise UserError(
            f"--batch-size {batch_size} (global) does not divide by the {replicas} replicas: "
            f"use a multiple of {replicas}"
        )


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


class _Throughput:
    """Step times for images/s and ETA, without the first step (tracing) and pauses
    (checkpoints, validation), which are not timed at all."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.interval_steps = self.total_steps = 0
        self.interval_time = self.total_time = 0.0

    def add(self, seconds: float) -> None:
        self.interval_steps += 1
        self.interval_time += seconds
        self.total_steps += 1
        self.total_time += seconds

    def images_per_second(self, total: bool = False) -> float:
        steps, seconds = ((self.total_steps, self.total_time) if total
                          else (self.interval_steps, self.interval_time))
        return steps * self.global_batch / seconds if seconds > 0 else 0.0

    def eta(self, remaining_steps: int) -> str:
        if not self.total_steps:
            return "?"
        return _format_duration(remaining_steps * self.total_time / self.total_steps)

    def reset_interval(self) -> None:
        self.interval_steps, self.interval_time = 0, 0.0


def make_eval_step(model, num_classes: int):
    """A tf.function: (uint8 images, labels) -> (top-1 hits, top-5 hits) for any batch size."""
    import tensorflow as tf

    k = min(5, num_classes)

    @tf.function(reduce_retracing=True)
    def eval_step(images, labels):
        logits = tf.cast(model(images, training=False), tf.float32)
        top1 = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                              labels), tf.int64))
        top5 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, k), tf.int64))
        return top1, top5

    return eval_step


def validate(eval_step, file_pattern: str, batch_size: int, image_size: int) -> dict:
    """Top-1/top-5 over every image of the matching shards."""
    hits1 = hits5 = images = 0
    for batch, labels in pipeline.eval_dataset(file_pattern, batch_size, image_size):
        top1, top5 = eval_step(batch, labels)
        hits1 += int(top1)
        hits5 += int(top5)
        images += int(labels.shape[0])
    if not images:
        return {"top1": 0.0, "top5": 0.0, "images": 0}
    return {"top1": hits1 / images, "top5": hits5 / images, "images": images}


def train(config: TrainConfig) -> dict:
    """Train as ``config`` says, resuming from ``MODEL/checkpoints``; returns the summary.

    Every worker of a cluster runs this with the same config; ``TF_CONFIG`` tells them apart.
    Raises :class:`Preempted` after a SIGTERM-triggered checkpoint, :class:`PeerLost` when
    another worker vanished (both :class:`RestartRequired`: rerun to resume),
    :class:`TrainingDiverged` on a non-finite loss, :class:`UserError` on bad input (before
    any training).
    """
    import keras

    previous_policy = keras.mixed_precision.global_policy()
    try:
        return _Trainer(config).run()
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


class _Trainer:
    def __init__(self, config: TrainConfig):
        config = config.validate()
        if not config.data_dir or not config.model_dir:
            raise UserError("--data-dir and --model-dir are required")
        self.config = config.updated(data_dir=storage.normalize(config.data_dir),
                                     model_dir=storage.normalize(config.model_dir))
        # Everything that can be refused is checked before a server starts or a file is written.
        strategy_lib.ensure_tf_config()  # under Trainer v2, from what JobSet gives the pod
        self.cluster = strategy_lib.cluster_from_env()
        self.train_pattern = tfrecord.shard_pattern(self.config.data_dir, "train")
        files = pipeline.list_files(self.train_pattern)
        if not self.config.data_service:
            pipeline.shard_files(files, self.cluster.num_workers, self.cluster.worker_id)
        # Every worker has the same devices, so the replica count is known before the strategy
        # starts (which, multi-worker, waits for the whole cluster).
        replicas = self.cluster.num_workers * max(1, len(strategy_lib.local_gpus()))
        _check_batch(self.config.batch_size, replicas)
        _check_model_dir(self.config)
        _check_classes(self.config)

    # --- setup --------------------------------------------------------------------------

    def _build(self):
        import keras
        import tensorflow as tf

        from resnet_imagenet.model.resnet import build_resnet, weight_decay_variables

        config, cluster = self.config, self.cluster
        self.strategy = strategy_lib.make_strategy(cluster)
        self.replicas = self.strategy.num_replicas_in_sync
        _check_batch(config.batch_size, self.replicas)
        gpus = strategy_lib.local_gpus()
        self.precision = resolve_precision(config.mixed_precision, gpus)
        self.jit = resolve_jit(config.jit_compile, gpus)
        keras.mixed_precision.set_global_policy(self.precision)

        self.num_train_images = config.num_train_images or pipeline.split_size(config.data_dir)
        self.steps_per_epoch = self.num_train_images / config.batch_size
        self.schedule = schedules.build(config, self.steps_per_epoch)

        with self.strategy.scope():
            self.model = build_resnet(config.resnet_size, config.num_classes, config.image_size,
                                      config.zero_init_residual)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch",
                                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            sgd = keras.optimizers.SGD(learning_rate=lambda: self.schedule(self.step),
                                       momentum=config.momentum)
            self.optimizer = (keras.optimizers.LossScaleOptimizer(sgd)
                              if self.precision == "mixed_float16" else sgd)
            # Keras 3 creates optimizer variables lazily; build them now so a restore fills
            # them instead of being deferred (and silently dropped).
            self.optimizer.build(self.model.trainable_variables)
        self.decay_variables = weight_decay_variables(self.model)
        # The plain SGD is checkpointed (momentum buffers), not the loss-scale wrapper: a run
        # can then resume under another precision; the loss scale re-adapts within steps.
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=sgd, step=self.step,
                                              epoch=self.epoch)
        self.writer = checkpoints.CheckpointWriter(self.checkpoint, config.model_dir,
                                                   cluster.is_chief, config.keep_checkpoints)

    def _restore(self) -> str | None:
        latest = self.writer.latest()
        if latest is None:
            log.info("no checkpoint in %s: starting from scratch", self.writer.directory)
            return None
        what = f"ResNet-{self.config.resnet_size} with {self.config.num_classes} classes"
        checkpoints.restore(self.checkpoint, self.model, latest, what)
        log.info("resumed from %s: step %d, epoch %d", latest, int(self.step.numpy()),
                 int(self.epoch.numpy()))
        return latest

    def _dataset(self, start_epoch: int):
        config = self.config
        # One tf.data service job per run (the model directory names the run), shared by its
        # workers; restarted workers rejoin it.
        job = "resnet-imagenet-" + hashlib.sha256(config.model_dir.encode()).hexdigest()[:16]

        def dataset_fn(context):
            return pipeline.train_dataset(
                self.train_pattern, context.get_per_replica_batch_size(config.batch_size),
                config.image_size, input_context=context, shuffle_buffer=config.shuffle_buffer,
                seed=config.seed, start_epoch=start_epoch, data_service=config.data_service,
                data_service_job=job, min_crop_area=config.min_crop_area, random_flip=config.random_flip,
            )

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    # --- the step ------------------------------------------------------------------------

    def _make_train_step(self):
        import tensorflow as tf

        config, model, optimizer = self.config, self.model, self.optimizer
        strategy, replicas = self.strategy, self.replicas
        loss_scaling = self.precision == "mixed_float16"
        smoothing, classes = config.label_smoothing, config.num_classes

        @tf.function(jit_compile=self.jit)
        def forward_backward(images, labels):
            with tf.GradientTape() as tape:
                logits = tf.cast(model(images, training=True), tf.float32)
                targets = tf.one_hot(labels, classes) * (1.0 - smoothing) + smoothing / classes
                per_example = tf.nn.softmax_cross_entropy_with_logits(targets, logits)
                cross_entropy = tf.nn.compute_average_loss(
                    per_example, global_batch_size=config.batch_size)
                l2 = config.weight_decay * tf.add_n(
                    [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in self.decay_variables])
                l2 = l2 / replicas
                loss = cross_entropy + l2
                scaled = optimizer.scale_loss(loss) if loss_scaling else loss
            grads = tape.gradient(scaled, model.trainable_variables)
            correct = tf.reduce_sum(tf.cast(
                tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
            return grads, tf.stack([loss, cross_entropy, l2, correct])

        def replica_step(images, labels, stop):
            grads, metrics = forward_backward(images, labels)
            optimizer.apply(grads, model.trainable_variables)
            return tf.concat([metrics, [stop]], axis=0)

        @tf.function
        def train_step(iterator, stop):
            images, labels = next(iterator)
            per_replica = strategy.run(replica_step, args=(images, labels, stop))
            totals = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            self.step.assign_add(1)
            return totals

        return train_step

    def _make_barrier(self):
        """A no-op all-reduce: returns on every worker once all have reached it."""
        import tensorflow as tf

        strategy = self.strategy

        @tf.function
        def barrier():
            ones = strategy.run(lambda: tf.constant(1.0))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

        return barrier

    # --- the loop ------------------------------------------------------------------------

    def _save(self, step: int) -> str:
        self.epoch.assign(step * self.config.batch_size // self.num_train_images)
        path = self.writer.save(step)
        log.info("checkpoint %s (epoch %d)", path, int(self.epoch.numpy()))
        return path

    def _validate(self, step: int) -> dict | None:
        """Chief only: top-1/top-5 on the validation split, logged and summarised."""
        if not self.cluster.is_chief or not self.validation_pattern:
            return None
        start = time.perf_counter()
        batch = max(1, self.config.batch_size // self.cluster.num_workers)
        result = validate(self.eval_step, self.validation_pattern, batch, self.config.image_size)
        self.summaries.validation(step, top1=result["top1"], top5=result["top5"])
        log.info("validation at step %d: top-1 %.4f, top-5 %.4f over %d images (%.1fs)",
                 step, result["top1"], result["top5"], result["images"],
                 time.perf_counter() - start)
        return result

    def run(self) -> dict:
        config, cluster = self.config, self.cluster
        self._build()
        resumed_from = self._restore()
        self.summaries = Summaries(config.model_dir, cluster.is_chief)
        if cluster.is_chief:
            storage.makedirs(config.model_dir)
            config_lib.save(config, config.model_dir)
            labels_lib.copy_to_model(config.data_dir, config.model_dir)
        validation_pattern = tfrecord.shard_pattern(config.data_dir, "validation")
        self.validation_pattern = validation_pattern if storage.glob(validation_pattern) else ""
        if cluster.is_chief and not self.validation_pattern:
            log.warning("no validation shards in %s: no validation during training",
                        config.data_dir)
        self.eval_step = make_eval_step(self.model, config.num_classes)
        self.barrier = self._make_barrier()
        self.start_step = self.current_step = int(self.step.numpy())
        log.info("ResNet-%d, %d classes, %dx%d images; global batch %d over %d replica(s) on "
                 "%d worker(s); %s; %s, XLA %s; %d images per epoch",
                 config.resnet_size, config.num_classes, config.image_size, config.image_size,
                 config.batch_size, self.replicas, cluster.num_workers, self.schedule.describe(),
                 self.precision, "on" if self.jit else "off", self.num_train_images)
        started = time.perf_counter()
        throughput = _Throughput(config.batch_size)
        try:
            with self._peers_watched():
                metrics, last_saved = self._loop(throughput, resumed_from is not None)
                step = self.current_step
                final_checkpoint = (self._save(step) if step != last_saved else storage.join(
                    self.writer.directory, f"{checkpoints.CHECKPOINT_NAME}-{step}"))
                validation = self._validate(step)
                # The others wait for the chief's validation: a worker that exits while another
                # still runs is reported as crashed by the cluster's health checks.
                self.barrier()
        finally:
            self.summaries.close()
        fingerprint = checkpoints.weights_fingerprint(self.model)
        log.info("weights sha256 %s (worker %d, step %d)", fingerprint, cluster.worker_id, step)
        summary = {
            "step": step,
            "start_step": self.start_step,
            "epoch": int(self.epoch.numpy()),
            "loss": metrics["loss"],
            "cross_entropy": metrics["cross_entropy"],
            "l2": metrics["l2"],
            "train_top1": metrics["correct"] / config.batch_size,
            "learning_rate": float(self.schedule(max(step - 1, 0))),
            "images_per_second": round(throughput.images_per_second(total=True), 2),
            "elapsed_seconds": round(time.perf_counter() - started, 2),
            "global_batch_size": config.batch_size,
            "num_replicas": self.replicas,
            "num_workers": cluster.num_workers,
            "worker": cluster.worker_id,
            "precision": self.precision,
            "jit_compile": self.jit,
            "resumed_from": resumed_from,
            "checkpoint": final_checkpoint,
            "validation": validation,
            "weights_sha256": fingerprint,
        }
        if cluster.is_chief:
            storage.write_text(storage.join(config.model_dir, SUMMARY_FILE),
                               json.dumps(summary, indent=2) + "\n")
        return summary

    def _loop(self, throughput: _Throughput, resumed: bool) -> tuple[dict, int]:
        """Steps until ``train_steps``; returns the last step's metrics and the last saved step."""
        import tensorflow as tf

        config = self.config
        iterator = iter(self._dataset(int(self.epoch.numpy())))
        train_step = self._make_train_step()
        stop = _StopSignal()
        last_saved = self.current_step if resumed else -1
        metrics = dict.fromkeys(_METRICS, float("nan"))
        with stop.installed():
            while self.current_step < config.train_steps:
                tick = time.perf_counter()
                totals = train_step(iterator, tf.constant(float(stop.requested)))
                # One small device-to-host copy per step, for the NaN check and the stop flag;
                # the input pipeline keeps prefetching on its own threads meanwhile.
                metrics = dict(zip(_METRICS, totals.numpy().tolist()))
                if self.current_step > self.start_step:  # the first step traces: not timed
                    throughput.add(time.perf_counter() - tick)
                self.current_step = step = self.current_step + 1
                if not math.isfinite(metrics["loss"]):
                    raise TrainingDiverged(
                        f"the loss is {metrics['loss']} at step {step}: training diverged; "
                        "lower --base-learning-rate or add --warmup-epochs, then resume or restart"
                    )
                if step % config.log_every == 0 or step == config.train_steps:
                    self._log_step(step, metrics, throughput)
                if metrics["stop"] > 0:
                    path = self._save(step)
                    self.barrier()  # every worker has saved before any exits
                    raise Preempted(step, path)
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    last_saved, _ = step, self._save(step)
                if (config.eval_every and step % config.eval_every == 0
                        and step < config.train_steps):
                    self._validate(step)
        return metrics, last_saved

    @contextlib.contextmanager
    def _peers_watched(self):
        """Multi-worker: a failed collective means a lost peer -> :class:`PeerLost`."""
        import tensorflow as tf

        lost = (tf.errors.UnavailableError, tf.errors.AbortedError,
                tf.errors.DeadlineExceededError)
        try:
            yield
        except lost as exc:
            if not self.cluster.is_multi_worker:
                raise
            log.debug("collective failure: %s", exc)
            raise PeerLost(
                f"worker {self.cluster.worker_id} lost contact with the other workers after "
                f"step {self.current_step} ({type(exc).__name__} in a collective); the restarted "
                "job resumes from the last checkpoint"
            ) from None

    def _log_step(self, step: int, metrics: dict, throughput: _Throughput) -> None:
        lr = float(self.schedule(step - 1))
        top1 = metrics["correct"] / self.config.batch_size
        images_per_second = throughput.images_per_second()
        log.info("step %d/%d  loss %.4f (ce %.4f, l2 %.4f)  lr %.5g  top-1 %.3f  "
                 "%.1f images/s  eta %s", step, self.config.train_steps, metrics["loss"],
                 metrics["cross_entropy"], metrics["l2"], lr, top1, images_per_second,
                 throughput.eta(self.config.train_steps - step))
        self.summaries.train(step, loss=metrics["loss"], cross_entropy=metrics["cross_entropy"],
                             l2=metrics["l2"], learning_rate=lr, top1=top1,
                             images_per_second=images_per_second)
        throughput.reset_interval()
