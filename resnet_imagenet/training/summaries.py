"""TensorBoard scalars of a training run, written by the chief only.

    MODEL/logs/train        loss/total, loss/cross_entropy, loss/l2, learning_rate, train/top1,
                            perf/images_per_second, data/skipped_records (unreadable records
                            skipped so far, all workers)
    MODEL/logs/validation   validation/top1, validation/top5, data/skipped_records (also
                            written by ``resnet-imagenet evaluate``, at the checkpoint's step)

Other workers get no-op writers: their values equal the chief's after every all-reduce, and
several writers on one directory would interleave event files.
"""

from __future__ import annotations

from resnet_imagenet import storage

TRAIN = "train"
VALIDATION = "validation"


def log_dir(model_dir: str, which: str) -> str:
    return storage.join(model_dir, "logs", which)


class Summaries:
    def __init__(self, model_dir: str, is_chief: bool):
        import tensorflow as tf

        self._tf = tf
        if is_chief:
            self._train = tf.summary.create_file_writer(log_dir(model_dir, TRAIN))
            self._validation = tf.summary.create_file_writer(log_dir(model_dir, VALIDATION))
        else:
            self._train = self._validation = tf.summary.create_noop_writer()

    def _write(self, writer, step: int, scalars: dict, flush: bool = False) -> None:
        with writer.as_default(step=step):
            for name, value in scalars.items():
                self._tf.summary.scalar(name, value)
        if flush:
            writer.flush()

    def train(self, step: int, *, loss: float, cross_entropy: float, l2: float,
              learning_rate: float, top1: float, images_per_second: float,
              skipped_records: int = 0) -> None:
        self._write(self._train, step, {
            "loss/total": loss,
            "loss/cross_entropy": cross_entropy,
            "loss/l2": l2,
            "learning_rate": learning_rate,
            "train/top1": top1,
            "perf/images_per_second": images_per_second,
            "data/skipped_records": skipped_records,
        })

    def validation(self, step: int, *, top1: float, top5: float,
                   skipped_records: int = 0) -> None:
        # Rare and awaited (an evaluator or a person watching): visible at once. Training
        # scalars are flushed by the writer every two minutes and at close -- on GCS every
        # flush uploads the whole event file again.
        self._write(self._validation, step, {"validation/top1": top1, "validation/top5": top5,
                                             "data/skipped_records": skipped_records},
                    flush=True)

    def close(self) -> None:
        self._train.close()
        self._validation.close()
