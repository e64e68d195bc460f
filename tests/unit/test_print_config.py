"""``train --print-config``: the exact keys and values it printed before TrainConfig had sections.

Held literally, so a refactoring of the settings cannot change what users, scripts and the
pipeline's logs see. Each case covers every key; the last one sets every flag to a value other
than its default. A setting added since (``max_bad_records``) is one more key, nothing else.
"""

from __future__ import annotations

import pytest

from resnet_imagenet import cli

THE_RECIPE_ARGS = []
THE_RECIPE = (
    '{"base_learning_rate": 0.1, "batch_size": 256, "bn_epsilon": 1e-05,'
    ' "bn_momentum": 0.997, "boundaries_unit": "steps", "checkpoint_every": 5000,'
    ' "data_dir": "", "data_service": "", "epochs": null, "eval_every": 0,'
    ' "image_size": 224, "jit_compile": "auto", "keep_checkpoints": 5,'
    ' "label_smoothing": 0.0, "learning_rate": 0.1, "log_every": 100,'
    ' "lr_boundaries": [150000, 300000, 400000, 450000], "lr_decay_factor": 0.1,'
    ' "lr_schedule": "step", "max_bad_records": "0.1%", "min_crop_area": 0.05,'
    ' "mixed_precision": "auto",'
    ' "model_dir": "", "momentum": 0.9, "num_classes": 1000, "num_train_images": 0,'
    ' "optimizer": "sgd", "random_flip": true, "resnet_size": 50,'
    ' "scale_lr_with_batch": true, "schedule": [{"learning_rate": 0.1, "step": 0},'
    ' {"learning_rate": 0.01, "step": 150000}, {"learning_rate": 0.001, "step": 300000},'
    ' {"learning_rate": 0.0001, "step": 400000}, {"learning_rate": 1e-05,'
    ' "step": 450000}], "seed": 0, "shuffle_buffer": 10000, "train_steps": 500000,'
    ' "warmup_epochs": 0.0, "weight_decay": 0.0001, "zero_init_residual": false}'
)

LARGE_BATCH_COSINE_ARGS = (
    '--batch-size 1024 --lr-schedule cosine --warmup-epochs 5 --num-train-images '
    '1281167'
).split()
LARGE_BATCH_COSINE = (
    '{"base_learning_rate": 0.1, "batch_size": 1024, "bn_epsilon": 1e-05,'
    ' "bn_momentum": 0.997, "boundaries_unit": "steps", "checkpoint_every": 5000,'
    ' "data_dir": "", "data_service": "", "epochs": 99.909, "eval_every": 0,'
    ' "image_size": 224, "jit_compile": "auto", "keep_checkpoints": 5,'
    ' "label_smoothing": 0.0, "learning_rate": 0.4, "log_every": 100, "lr_boundaries": [],'
    ' "lr_decay_factor": 0.1, "lr_schedule": "cosine", "max_bad_records": "0.1%",'
    ' "min_crop_area": 0.05,'
    ' "mixed_precision": "auto", "model_dir": "", "momentum": 0.9, "num_classes": 1000,'
    ' "num_train_images": 1281167, "optimizer": "sgd", "random_flip": true,'
    ' "resnet_size": 50, "scale_lr_with_batch": true, "schedule": [{"learning_rate": 0.0,'
    ' "step": 0}, {"learning_rate": 0.4, "step": 6256}, {"learning_rate": 0.0,'
    ' "step": 125000}], "seed": 0, "shuffle_buffer": 10000, "train_steps": 125000,'
    ' "warmup_epochs": 5.0, "weight_decay": 0.0001, "zero_init_residual": false}'
)

EVERY_FLAG_ARGS = (
    '--data-dir gs://b/data --model-dir gs://b/model --image-size 160 --num-classes '
    '10 --resnet-size 18 --zero-init-residual --bn-momentum 0.9 --bn-epsilon 0.001 '
    '--batch-size 512 --train-steps 2000 --momentum 0.875 --base-learning-rate 0.2 '
    '--lr-boundaries 10 20 --lr-decay-factor 0.5 --boundaries-unit epochs '
    '--num-train-images 25600 --no-scale-lr-with-batch --warmup-epochs 1 '
    '--weight-decay 5e-5 --label-smoothing 0.1 --min-crop-area 0.08 --no-random-flip '
    '--mixed-precision bfloat16 --jit-compile off --checkpoint-every 100 '
    '--keep-checkpoints 2 --log-every 10 --eval-every 50 --data-service host:5050 '
    '--shuffle-buffer 100 --seed 7 --max-bad-records 500'
).split()
EVERY_FLAG = (
    '{"base_learning_rate": 0.2, "batch_size": 512, "bn_epsilon": 0.001,'
    ' "bn_momentum": 0.9, "boundaries_unit": "epochs", "checkpoint_every": 100,'
    ' "data_dir": "gs://b/data", "data_service": "host:5050", "epochs": 40.0,'
    ' "eval_every": 50, "image_size": 160, "jit_compile": "off", "keep_checkpoints": 2,'
    ' "label_smoothing": 0.1, "learning_rate": 0.2, "log_every": 10, "lr_boundaries": [10,'
    ' 20], "lr_decay_factor": 0.5, "lr_schedule": "step", "max_bad_records": "500",'
    ' "min_crop_area": 0.08,'
    ' "mixed_precision": "bfloat16", "model_dir": "gs://b/model", "momentum": 0.875,'
    ' "num_classes": 10, "num_train_images": 25600, "optimizer": "sgd",'
    ' "random_flip": false, "resnet_size": 18, "scale_lr_with_batch": false,'
    ' "schedule": [{"learning_rate": 0.0, "step": 0}, {"learning_rate": 0.2, "step": 50},'
    ' {"learning_rate": 0.1, "step": 500}, {"learning_rate": 0.05, "step": 1000}],'
    ' "seed": 7, "shuffle_buffer": 100, "train_steps": 2000, "warmup_epochs": 1.0,'
    ' "weight_decay": 5e-05, "zero_init_residual": true}'
)


@pytest.mark.parametrize("args, printed", [
    (THE_RECIPE_ARGS, THE_RECIPE),
    (LARGE_BATCH_COSINE_ARGS, LARGE_BATCH_COSINE),
    (EVERY_FLAG_ARGS, EVERY_FLAG),
], ids=["the-recipe", "large-batch-cosine", "every-flag"])
def test_print_config_prints_what_it_always_printed(capsys, args, printed):
    assert cli.main(["train", "--print-config", *args]) == 0
    assert capsys.readouterr().out == printed + "\n"
