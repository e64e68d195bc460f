"""The custom training loop: one code path for one CPU, several GPUs and many workers.

    summary = train(config)     # every worker of a cluster, the same config; TF_CONFIG tells
                                # them apart

Each step runs :func:`~resnet_imagenet.training.steps.make_train_step`'s step and all-reduces
the loss, cross-entropy, L2, correct predictions and a stop flag; SIGTERM on any worker raises
that flag, and every worker then saves at the same step and stops
(:mod:`~resnet_imagenet.training.stopping`). Before every checkpoint and validation the
batch-norm moving statistics become their mean over replicas; validation runs float32.
Checkpoints hold each replica's input position, and a resumed worker restarts its stream just
after it. docs/training.md says why it works this way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time

from resnet_imagenet import config as config_lib
from resnet_imagenet import storage
from resnet_imagenet.config import TrainConfig
from resnet_imagenet.data import labels as labels_lib
from resnet_imagenet.data import bad_records, pipeline, tfrecord
from resnet_imagenet.errors import UserError
from resnet_imagenet.training import checkpoints, checks, schedules, steps
from resnet_imagenet.training import strategy as strategy_lib
from resnet_imagenet.training.progress import Throughput
from resnet_imagenet.training.stopping import PeerLost, Preempted, StopSignal, TrainingDiverged
from resnet_imagenet.training.summaries import Summaries

log = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"
_METRICS = ("loss", "cross_entropy", "l2", "correct", "stop", "skipped")


def train(config: TrainConfig, *, allow_cpu: bool = False) -> dict:
    """Train as ``config`` says, resuming from ``MODEL/checkpoints``; returns the summary.
    ``allow_cpu``: go on (warn) when this worker sees fewer GPUs than its launcher gave it.

    Every worker of a cluster runs this with the same config; ``TF_CONFIG`` tells them apart.
    Raises (from :mod:`~resnet_imagenet.training.stopping`) ``Preempted`` after a
    SIGTERM-triggered checkpoint, ``PeerLost`` when another worker vanished (both
    ``RestartRequired``: rerun to resume), ``TrainingDiverged`` on a non-finite loss;
    :class:`UserError` on bad input (before any training).
    """
    import keras

    previous_policy = keras.mixed_precision.global_policy()
    try:
        return _Trainer(config, allow_cpu=allow_cpu).run()
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


class _Trainer:
    def __init__(self, config: TrainConfig, *, allow_cpu: bool = False):
        config = config.validate().effective()
        if not config.data.data_dir or not config.runtime.model_dir:
            raise UserError("--data-dir and --model-dir are required")
        self.config = config.updated(data_dir=storage.normalize(config.data.data_dir),
                                     model_dir=storage.normalize(config.runtime.model_dir))
        # Everything that can be refused is checked before a server starts or a file is written.
        strategy_lib.ensure_tf_config()  # under Trainer v2, from what JobSet gives the pod
        self.cluster = strategy_lib.cluster_from_env()
        gpus = len(strategy_lib.local_gpus())
        checks.check_gpus(os.environ.get(strategy_lib.GPUS_ENV), gpus, allow_cpu)
        self.train_pattern = tfrecord.shard_pattern(self.config.data.data_dir, "train")
        files = pipeline.list_files(self.train_pattern)
        if not self.config.data.data_service:
            pipeline.shard_files(files, self.cluster.num_workers, self.cluster.worker_id)
        # Every worker has the same devices, so the replica count is known before the strategy
        # starts (which, multi-worker, waits for the whole cluster).
        replicas = self.cluster.num_workers * max(1, gpus)
        checks.check_batch(self.config.optimization.batch_size, replicas)
        checks.check_model_dir(self.config)
        checks.check_classes(self.config)
        self.bound = bad_records.Bound(self.config.data.max_bad_records)
        self.registry = bad_records.Registry()  # the shards this worker's input skipped in

    # --- setup --------------------------------------------------------------------------

    def _build(self):
        import keras
        import tensorflow as tf

        from resnet_imagenet.model.resnet import build_resnet, weight_decay_variables

        config, cluster = self.config, self.cluster
        # --seed seeds the weight initialisation and the augmentation too (Python, NumPy,
        # TensorFlow and Keras's global seeds), not only the file order: two runs with the same
        # seed start from the same weights.
        keras.utils.set_random_seed(config.data.seed)
        self.strategy = strategy_lib.make_strategy(cluster)
        self.replicas = self.strategy.num_replicas_in_sync
        checks.check_batch(config.optimization.batch_size, self.replicas)
        gpus = strategy_lib.local_gpus()
        self.precision = checks.resolve_precision(config.runtime.mixed_precision, gpus)
        self.jit = checks.resolve_jit(config.runtime.jit_compile, gpus)
        keras.mixed_precision.set_global_policy(self.precision)

        self.num_train_images = (config.data.num_train_images
                                 or pipeline.split_size(config.data.data_dir))
        self.steps_per_epoch = self.num_train_images / config.optimization.batch_size
        self.schedule = schedules.build(config.optimization, self.steps_per_epoch)

        net = config.model
        with self.strategy.scope():
            self.model = build_resnet(net.resnet_size, net.num_classes, net.image_size,
                                      net.zero_init_residual, bn_momentum=net.bn_momentum,
                                      bn_epsilon=net.bn_epsilon)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch",
                                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            sgd = keras.optimizers.SGD(learning_rate=lambda: self.schedule(self.step),
                                       momentum=config.optimization.momentum)
            self.optimizer = (keras.optimizers.LossScaleOptimizer(sgd)
                              if self.precision == "mixed_float16" else sgd)
            # Keras 3 creates optimizer variables lazily; build them now so a restore fills
            # them instead of being deferred (and silently dropped).
            self.optimizer.build(self.model.trainable_variables)
        self.decay_variables = weight_decay_variables(self.model)
        self.average_batch_norm = steps.make_batch_norm_average(self.strategy, self.model)
        # Per replica, (epoch, index) of the last example it consumed: where to resume. Saved,
        # not restored (a checkpoint of another replica count has another shape): read back
        # by _restore.
        self.input_positions = tf.Variable(
            tf.fill([self.replicas, 2], tf.constant(-1.0, tf.float64)), trainable=False,
            name="input_positions")
        self.gather_positions = steps.make_gather_positions(self.strategy)
        # [records skipped, records seen] by all workers (the same on each): saved with the
        # input positions, read back by _restore.
        self.data_counts = tf.Variable(tf.zeros([2], tf.int64), trainable=False,
                                       name="data_counts")
        # The plain SGD is checkpointed (momentum buffers), not the loss-scale wrapper: a run
        # can then resume under another precision; the loss scale re-adapts within steps.
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=sgd, step=self.step,
                                              epoch=self.epoch)
        saved = tf.train.Checkpoint(model=self.model, optimizer=sgd, step=self.step,
                                    epoch=self.epoch, input_positions=self.input_positions,
                                    data_counts=self.data_counts)
        self.writer = checkpoints.CheckpointWriter(saved, config.runtime.model_dir,
                                                   cluster.is_chief,
                                                   config.runtime.keep_checkpoints)

    def _restore(self) -> str | None:
        """Restore the latest checkpoint, if any; sets where this worker's input resumes."""
        import tensorflow as tf

        self.input_start = (0, 0)  # (epoch, records to skip in it)
        self.position = -1  # the last consumed example's position in this worker's stream
        self.skipped = self.seen = 0  # unreadable records skipped, records seen: all workers
        latest = self.writer.latest()
        if latest is None:
            log.info("no checkpoint in %s: starting from scratch", self.writer.directory)
            return None
        net = self.config.model
        what = f"ResNet-{net.resnet_size} with {net.num_classes} classes"
        checkpoints.restore(self.checkpoint, self.model, latest, what)
        self.input_start = (int(self.epoch.numpy()), 0)
        reader = tf.train.load_checkpoint(latest)
        key = "input_positions/.ATTRIBUTES/VARIABLE_VALUE"
        positions = reader.get_tensor(key) if reader.has_tensor(key) else None
        counts = "data_counts/.ATTRIBUTES/VARIABLE_VALUE"
        if reader.has_tensor(counts):
            self.skipped, self.seen = (int(v) for v in reader.get_tensor(counts))
        mine = self.cluster.worker_id * (self.replicas // self.cluster.num_workers)
        if self.config.data.data_service:
            log.info("input from a tf.data service: resuming at the start of epoch %d",
                     self.input_start[0])
        elif positions is None or positions.shape != (self.replicas, 2) or positions[mine][0] < 0:
            log.warning("%s holds no input position for %d replica(s): the input restarts at "
                        "the start of epoch %d", latest, self.replicas, self.input_start[0])
        else:
            epoch, index = (int(v) for v in positions[mine])
            self.input_start = (epoch, index + 1)
            self.position = pipeline.position(epoch, index)
        log.info("resumed from %s: step %d, input at epoch %d past %d example(s)", latest,
                 int(self.step.numpy()), *self.input_start)
        return latest

    def _dataset(self, start_epoch: int, skip: int):
        data, config = self.config.data, self.config
        # One tf.data service job per run (the model directory names the run), shared by its
        # workers; restarted workers rejoin it.
        job = "resnet-imagenet-" + hashlib.sha256(
            config.runtime.model_dir.encode()).hexdigest()[:16]

        def dataset_fn(context):
            return pipeline.train_dataset(
                self.train_pattern,
                context.get_per_replica_batch_size(config.optimization.batch_size),
                config.model.image_size, input_context=context, shuffle_buffer=data.shuffle_buffer,
                seed=data.seed, start_epoch=start_epoch, skip=skip, with_positions=True,
                with_skipped=True, registry=self.registry,
                num_classes=config.model.num_classes, data_service=data.data_service,
                data_service_job=job, min_crop_area=data.min_crop_area,
                random_flip=data.random_flip,
            )

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    # --- the loop ------------------------------------------------------------------------

    def _sync_replicas(self) -> None:
        """Every worker: batch-norm statistics to their mean over replicas, input positions
        gathered (both collectives), before a checkpoint or a validation."""
        import tensorflow as tf

        self.average_batch_norm()
        epoch, index = pipeline.split_position(self.position) if self.position >= 0 else (-1, -1)
        self.input_positions.assign(tf.cast(self.gather_positions(
            tf.constant([epoch, index], tf.float64)), tf.float64))
        self.data_counts.assign([self.skipped, self.seen])

    def _save(self, step: int) -> str:
        self._sync_replicas()
        self.epoch.assign(step * self.config.optimization.batch_size // self.num_train_images)
        path = self.writer.save(step)
        log.info("checkpoint %s (epoch %d)", path, int(self.epoch.numpy()))
        return path

    def _validate(self, step: int) -> dict | None:
        """Chief only: top-1/top-5 on the validation split, logged and summarised."""
        if not self.cluster.is_chief or not self.validation_pattern:
            return None
        start = time.perf_counter()
        batch = max(1, self.config.optimization.batch_size // self.cluster.num_workers)
        if self.eval_model is not self.model:  # a float32 copy of the mixed-precision model
            self.eval_model.set_weights([v.numpy() for v in self.model.weights])
        result = steps.validate(self.eval_step, self.validation_pattern, batch,
                                self.config.model.image_size)
        result["precision"] = "float32"
        self.summaries.validation(step, top1=result["top1"], top5=result["top5"],
                                  skipped_records=result["skipped_records"])
        log.info("validation (float32) at step %d: top-1 %.4f, top-5 %.4f over %d images%s "
                 "(%.1fs)", step, result["top1"], result["top5"], result["images"],
                 f", {result['skipped_records']} unreadable record(s) skipped"
                 if result["skipped_records"] else "", time.perf_counter() - start)
        return result

    def run(self) -> dict:
        config, cluster = self.config, self.cluster
        self._build()
        resumed_from = self._restore()
        self.summaries = Summaries(config.runtime.model_dir, cluster.is_chief)
        if cluster.is_chief:
            storage.makedirs(config.runtime.model_dir)
            config_lib.save(config, config.runtime.model_dir)
            labels_lib.copy_to_model(config.data.data_dir, config.runtime.model_dir,
                                     config.model.num_classes)
        validation_pattern = tfrecord.shard_pattern(config.data.data_dir, "validation")
        self.validation_pattern = validation_pattern if storage.glob(validation_pattern) else ""
        if cluster.is_chief and not self.validation_pattern:
            log.warning("no validation shards in %s: no validation during training",
                        config.data.data_dir)
        # Validation runs float32, as `resnet-imagenet evaluate` and the SavedModel do: under
        # mixed precision, on a float32 copy that takes the weights before each validation.
        self.eval_model = self.model
        if self.precision != "float32" and cluster.is_chief and self.validation_pattern:
            from resnet_imagenet import evaluation

            self.eval_model = evaluation.build_model(config)
        self.eval_step = steps.make_eval_step(self.eval_model, config.model.num_classes)
        self.barrier = steps.make_barrier(self.strategy)
        self.start_step = self.current_step = int(self.step.numpy())
        log.info("ResNet-%d, %d classes, %dx%d images; global batch %d over %d replica(s) on "
                 "%d worker(s); %s; %s, XLA %s; %d images per epoch",
                 config.model.resnet_size, config.model.num_classes, config.model.image_size,
                 config.model.image_size, config.optimization.batch_size, self.replicas,
                 cluster.num_workers, self.schedule.describe(), self.precision,
                 "on" if self.jit else "off", self.num_train_images)
        started = time.perf_counter()
        throughput = Throughput(config.optimization.batch_size)
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
            "train_top1": metrics["correct"] / config.optimization.batch_size,
            "learning_rate": float(self.schedule(max(step - 1, 0))),
            "images_per_second": round(throughput.images_per_second(total=True), 2),
            "elapsed_seconds": round(time.perf_counter() - started, 2),
            "global_batch_size": config.optimization.batch_size,
            "num_replicas": self.replicas,
            "num_workers": cluster.num_workers,
            "worker": cluster.worker_id,
            "precision": self.precision,
            "jit_compile": self.jit,
            "resumed_from": resumed_from,
            "input_position": list(pipeline.split_position(self.position)),
            "skipped_records": self.skipped,  # all workers'
            "records_seen": self.seen,
            "unreadable_shards": self.registry.shards(),  # this worker's
            "checkpoint": final_checkpoint,
            "validation": validation,
            "weights_sha256": fingerprint,
        }
        if cluster.is_chief:
            storage.write_text(storage.join(config.runtime.model_dir, SUMMARY_FILE),
                               json.dumps(summary, indent=2) + "\n")
        return summary

    def _loop(self, throughput: Throughput, resumed: bool) -> tuple[dict, int]:
        """Steps until ``train_steps``; returns the last step's metrics and the last saved step."""
        import tensorflow as tf

        optimization, runtime = self.config.optimization, self.config.runtime
        iterator = iter(self._dataset(*self.input_start))
        train_step = steps.make_train_step(
            self.strategy, self.model, self.optimizer, self.decay_variables, self.step,
            global_batch_size=optimization.batch_size, num_classes=self.config.model.num_classes,
            label_smoothing=optimization.label_smoothing, weight_decay=optimization.weight_decay,
            loss_scaling=self.precision == "mixed_float16", jit_compile=self.jit)
        stop = StopSignal()
        last_saved = self.current_step if resumed else -1
        metrics = dict.fromkeys(_METRICS, float("nan"))
        with stop.installed():
            while self.current_step < optimization.train_steps:
                tick = time.perf_counter()
                try:
                    totals, position = train_step(iterator, tf.constant(float(stop.requested)))
                except tf.errors.InvalidArgumentError as exc:
                    error = checks.bad_label_error(exc)
                    if error is None:
                        raise
                    raise error from None
                # One small device-to-host copy per step, for the NaN check and the stop flag;
                # the input pipeline keeps prefetching on its own threads meanwhile.
                metrics = dict(zip(_METRICS, totals.numpy().tolist()))
                self.position = int(position.numpy())
                self._count_unreadable(int(metrics["skipped"]))
                if self.current_step > self.start_step:  # the first step traces: not timed
                    throughput.add(time.perf_counter() - tick)
                self.current_step = step = self.current_step + 1
                if not math.isfinite(metrics["loss"]):
                    raise TrainingDiverged(
                        f"the loss is {metrics['loss']} at step {step}: training diverged; "
                        "lower --base-learning-rate or add --warmup-epochs, then resume or restart"
                    )
                if step % runtime.log_every == 0 or step == optimization.train_steps:
                    self._log_step(step, metrics, throughput)
                if metrics["stop"] > 0:
                    path = self._save(step)
                    self.barrier()  # every worker has saved before any exits
                    raise Preempted(step, path)
                if runtime.checkpoint_every and step % runtime.checkpoint_every == 0:
                    last_saved, _ = step, self._save(step)
                if (runtime.eval_every and step % runtime.eval_every == 0
                        and step < optimization.train_steps):
                    self._sync_replicas()  # every worker: a collective
                    self._validate(step)
        return metrics, last_saved

    def _count_unreadable(self, skipped: int) -> None:
        """Add one step's unreadable records (all workers', so every worker decides alike) and
        stop past ``--max-bad-records``."""
        self.skipped += skipped
        self.seen += self.config.optimization.batch_size + skipped
        if skipped and self.bound.exceeded(self.skipped, self.seen, self.num_train_images):
            raise bad_records.too_many(self.bound, self.skipped, self.seen,
                                       self.num_train_images, self.registry, "training")

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

    def _log_step(self, step: int, metrics: dict, throughput: Throughput) -> None:
        optimization = self.config.optimization
        lr = float(self.schedule(step - 1))
        top1 = metrics["correct"] / optimization.batch_size
        images_per_second = throughput.images_per_second()
        log.info("step %d/%d  loss %.4f (ce %.4f, l2 %.4f)  lr %.5g  top-1 %.3f  "
                 "%.1f images/s  eta %s", step, optimization.train_steps, metrics["loss"],
                 metrics["cross_entropy"], metrics["l2"], lr, top1, images_per_second,
                 throughput.eta(optimization.train_steps - step))
        if self.skipped:
            log.info("%d unreadable training record(s) skipped so far, of %d seen",
                     self.skipped, self.seen)
        self.summaries.train(step, loss=metrics["loss"], cross_entropy=metrics["cross_entropy"],
                             l2=metrics["l2"], learning_rate=lr, top1=top1,
                             images_per_second=images_per_second, skipped_records=self.skipped)
        throughput.reset_interval()
