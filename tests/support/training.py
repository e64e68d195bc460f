"""Reading back what training wrote, independently of the library's own readers."""

from __future__ import annotations

import collections
import glob
import os


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files of one local directory.

    Every event is kept, in file order: a step written twice (redone after a resume) appears
    twice, unlike in :func:`resnet_imagenet.report.read_scalars`.
    """
    import tensorflow as tf

    out = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for raw in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for value in event.summary.value:
                out[value.tag].append((event.step, float(tf.make_ndarray(value.tensor))))
    return dict(out)
