"""The compiled pieces of the training loop: the train step, validation, and the collectives.

Each ``make_*`` function returns a ``tf.function`` over a built model and strategy:

    train_step = make_train_step(strategy, model, optimizer, decay_variables, step, ...)
    totals, position = train_step(iterator, stop_flag)
    hits1, hits5 = make_eval_step(model, num_classes)(images, labels)

Every worker must call the functions that contain a collective (the train step, the
batch-norm average, the position gather, the barrier) the same number of times, in the same
order.
"""

from __future__ import annotations

from resnet_imagenet.data import pipeline


def make_train_step(strategy, model, optimizer, decay_variables: list, step, *,
                    global_batch_size: int, num_classes: int, label_smoothing: float,
                    weight_decay: float, loss_scaling: bool, jit_compile: bool):
    """A tf.function ``(iterator, stop) -> (totals, position)``: one optimizer step.

    Per replica: softmax cross-entropy (with ``label_smoothing``) summed and divided by the
    global batch, plus ``weight_decay`` * L2 of ``decay_variables`` divided by the replica
    count, so that the gradients Keras sums across replicas are those of the global-batch loss.
    ``totals`` is the sum over all replicas of [loss, cross-entropy, L2, correct predictions,
    stop, skipped] (``stop`` is this worker's 0/1 stop request, ``skipped`` the unreadable
    records its input skipped on the way to this batch); ``position`` is the largest input
    position this worker's replicas consumed. ``step`` (a variable) is incremented.
    The forward/backward pass is XLA-compiled with ``jit_compile``; the all-reduce and the
    update stay outside XLA, which cannot compile multi-worker collectives.
    """
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    smoothing, classes = label_smoothing, num_classes

    @tf.function(jit_compile=jit_compile)
    def forward_backward(images, labels):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            targets = tf.one_hot(labels, classes) * (1.0 - smoothing) + smoothing / classes
            per_example = tf.nn.softmax_cross_entropy_with_logits(targets, logits)
            cross_entropy = tf.nn.compute_average_loss(
                per_example, global_batch_size=global_batch_size)
            l2 = weight_decay * tf.add_n(
                [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in decay_variables])
            l2 = l2 / replicas
            loss = cross_entropy + l2
            scaled = optimizer.scale_loss(loss) if loss_scaling else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
        return grads, tf.stack([loss, cross_entropy, l2, correct])

    def replica_step(images, labels, positions, skipped, stop):
        grads, metrics = forward_backward(images, labels)
        apply_gradients(optimizer, grads, model.trainable_variables, loss_scaling)
        skipped = tf.cast(tf.reduce_sum(skipped), tf.float32)
        return tf.concat([metrics, [stop, skipped]], axis=0), tf.reduce_max(positions)

    @tf.function
    def train_step(iterator, stop):
        images, labels, positions, skipped = next(iterator)
        per_replica, last = strategy.run(replica_step,
                                         args=(images, labels, positions, skipped, stop))
        totals = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        step.assign_add(1)
        # This worker's replicas' last positions: their maximum is where its stream is.
        return totals, tf.reduce_max(tf.stack(strategy.experimental_local_results(last)))

    return train_step


def apply_gradients(optimizer, grads, variables, loss_scaling: bool) -> None:
    """Apply one replica's gradients (in a replica context), agreeing on skips when scaling.

    Keras' ``LossScaleOptimizer`` decides from the gradients it is given whether to apply them
    or to skip the step and halve the scale; it is given this replica's own, not-yet-reduced
    gradients, and under MirroredStrategy it reads the decision of the first replica only
    (another replica's overflow then reaches the weights as inf/NaN), under
    MultiWorkerMirroredStrategy each worker decides alone (and their collectives part ways).
    So first all-reduce one flag, "one of my gradients is not finite", and poison every
    replica's gradients when any is set: every replica of every worker then sees non-finite
    gradients, skips the step and lowers the scale -- together.
    """
    if loss_scaling:
        grads = _non_finite_everywhere_if_anywhere(grads)
    optimizer.apply(grads, variables)


def _non_finite_everywhere_if_anywhere(grads: list) -> list:
    import tensorflow as tf

    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    bad_here = tf.cast(tf.logical_not(finite), tf.float32)
    bad_anywhere = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, bad_here)
    poison = tf.where(bad_anywhere > 0, float("nan"), 0.0)
    return [g + tf.cast(poison, g.dtype) for g in grads]


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
    """Top-1/top-5 over every readable image of the matching shards; ``skipped_records`` and
    ``unreadable_shards`` say what could not be read."""
    from resnet_imagenet.data import bad_records

    hits1 = hits5 = images = 0
    registry = bad_records.Registry()
    for batch, labels in pipeline.eval_dataset(file_pattern, batch_size, image_size,
                                               registry=registry):
        top1, top5 = eval_step(batch, labels)
        hits1 += int(top1)
        hits5 += int(top5)
        images += int(labels.shape[0])
    unreadable = {"skipped_records": registry.records, "unreadable_shards": registry.shards()}
    if not images:
        return {"top1": 0.0, "top5": 0.0, "images": 0, **unreadable}
    return {"top1": hits1 / images, "top5": hits5 / images, "images": images, **unreadable}


def batch_norm_statistics(model) -> list:
    """The moving means and variances of every batch-norm layer of ``model``."""
    import keras

    return [v for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)]


def make_batch_norm_average(strategy, model):
    """A tf.function that sets each replica's batch-norm moving statistics to their mean over
    all replicas (of all workers: every worker must call it, like any collective)."""
    import tensorflow as tf

    statistics = batch_norm_statistics(model)

    def average():
        context = tf.distribute.get_replica_context()
        # tf.identity: this replica's values as plain tensors (under MultiWorkerMirroredStrategy
        # an all-reduce of the variables themselves has no destinations).
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                   [tf.identity(v.value) for v in statistics])
        for variable, mean in zip(statistics, means):
            variable.assign(mean)

    @tf.function
    def average_batch_norm_statistics():
        strategy.run(average)

    return average_batch_norm_statistics


def make_gather_positions(strategy):
    """A tf.function: this worker's last input position -> every replica's, [replicas, 2]."""
    import tensorflow as tf

    def gather(position):
        return tf.distribute.get_replica_context().all_gather(position[None], axis=0)

    @tf.function
    def gather_positions(position):
        gathered = strategy.run(gather, args=(position,))
        return strategy.experimental_local_results(gathered)[0]

    return gather_positions


def make_barrier(strategy):
    """A tf.function, a no-op all-reduce: returns on every worker once all have reached it."""
    import tensorflow as tf

    @tf.function
    def barrier():
        ones = strategy.run(lambda: tf.constant(1.0))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

    return barrier
