"""Checkpoints of a training run: where each worker writes, resume, and refusing the wrong model.

Layout (the model-directory contract): ``MODEL/checkpoints`` holds a ``tf.train.CheckpointManager``
over ``tf.train.Checkpoint(model=, optimizer=, step=, epoch=)`` with files ``ckpt-<step>``.

Under MultiWorkerMirroredStrategy every worker must take part in a save (values can need
collectives to read), but only the chief's copy is kept: the other workers write to a local
temporary directory that they delete straight after. Every worker restores from the chief's
directory, which is why it must be shared storage (GCS in a cluster, one directory locally).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile

from resnet_imagenet import storage
from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = "ckpt"


def checkpoint_dir(model_dir: str) -> str:
    return storage.join(model_dir, CHECKPOINT_DIR)


class CheckpointWriter:
    """Saves ``checkpoint`` as ``ckpt-<step>``: for real on the chief, to scratch elsewhere."""

    def __init__(self, checkpoint, model_dir: str, is_chief: bool, keep: int):
        import tensorflow as tf

        self.is_chief = is_chief
        self.directory = checkpoint_dir(model_dir)
        self.manager = tf.train.CheckpointManager(
            checkpoint, self.directory, max_to_keep=keep, checkpoint_name=CHECKPOINT_NAME)
        self._checkpoint = checkpoint
        self._keep = keep

    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str:
        """Write the checkpoint of ``step``; returns the chief's path of it (on every worker)."""
        import tensorflow as tf

        if self.is_chief:
            return self.manager.save(checkpoint_number=step)
        scratch = tempfile.mkdtemp(prefix="resnet-imagenet-ckpt-")
        try:
            tf.train.CheckpointManager(self._checkpoint, scratch, max_to_keep=1,
                                       checkpoint_name=CHECKPOINT_NAME).save(checkpoint_number=step)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return storage.join(self.directory, f"{CHECKPOINT_NAME}-{step}")


def saved_model_shapes(path: str, name: str = "model") -> list[tuple]:
    """Shapes of the variables under the checkpoint's ``name`` object, sorted."""
    import tensorflow as tf

    return object_variable_shapes(tf.train.load_checkpoint(path), name)


def object_variable_shapes(reader, name: str = "model") -> list[tuple]:
    """Like :func:`saved_model_shapes`, from an open ``tf.train.load_checkpoint`` reader.

    Read from the checkpoint's object graph: a variable is stored once under whichever path
    reached it first (a model's kernels usually under ``optimizer/``), so key prefixes do not
    tell which variables belong to the model; the graph does.
    """
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    roots = [c.node_id for c in graph.nodes[0].children if c.local_name == name]
    seen, stack, keys = set(roots), list(roots), set()
    while stack:
        node = graph.nodes[stack.pop()]
        keys.update(a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE")
        for child in node.children:
            if child.node_id not in seen:
                seen.add(child.node_id)
                stack.append(child.node_id)
    shapes = reader.get_variable_to_shape_map()
    return sorted(tuple(shapes[key]) for key in keys if key in shapes)


def restore(checkpoint, model, path: str, what: str) -> None:
    """Restore every object of ``checkpoint`` from ``path``, or fail with a one-line error.

    ``what`` names the model being restored into (e.g. "ResNet-50 with 1000 classes"), so a
    checkpoint of another depth or class count is refused with a message that says so. The
    model's shapes are compared first, from the checkpoint's index alone: a restore that fails
    half-way would leave TensorFlow to report every unmatched value when it is collected.
    """
    import tensorflow as tf

    refusal = (f"checkpoint {path} does not fit {what}: it was written by another model; use a "
               "new --model-dir or the settings it was trained with")
    try:
        if saved_model_shapes(path) != sorted(tuple(v.shape) for v in model.weights):
            raise UserError(refusal)
        # expect_partial: values the restoring objects do not hold (the input positions,
        # read separately by the loop) are not worth a warning.
        checkpoint.restore(path).assert_existing_objects_matched().expect_partial()
    except IndexError as exc:  # a data file shorter than its index says: a copy cut short
        raise UserError(f"checkpoint {path} is damaged ({exc}): delete its files to resume from "
                        "the checkpoint before it") from None
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{refusal} ({reason})") from None


def weights_fingerprint(model) -> str:
    """SHA-256 over the model's trainable weights, in order (identical on in-sync replicas).

    Batch-norm moving statistics are left out: Keras 3 keeps them per replica (each worker's
    estimate from its own batches) until the loop averages them before a checkpoint.
    """
    digest = hashlib.sha256()
    for variable in model.trainable_weights:
        digest.update(variable.path.encode())
        digest.update(variable.numpy().tobytes())
    return digest.hexdigest()
