"""``resnet-imagenet export``: a SavedModel that serves JPEG/PNG bytes on CPU or GPU.

    resnet-imagenet export --model-dir MODEL --export-dir SAVED [--checkpoint PATH]
                           [--version N] [--overwrite]

writes ``SAVED/<N>/`` (default ``SAVED/1/``), the layout TensorFlow Serving and KServe's
TensorFlow runtime watch: a numeric version folder under a base path. Signatures:

``serving_default``
    input ``image_bytes``: string ``[batch]``, each a JPEG, PNG, GIF or BMP file's bytes. The eval
    preprocessing of training (decode, shorter side to S/0.875, central crop) runs in the graph,
    so clients send files, not tensors.
``predict_images``
    input ``images``: uint8 ``[batch, S, S, 3]``, already preprocessed.

Both return ``classes`` (int64 ``[batch]``, labels 1..N as in the TFRecords), ``probabilities``
(float32 ``[batch, N]``), ``top5_classes``, ``top5_probabilities``, and ``top5_synsets`` /
``top5_texts`` (strings from MODEL/labels.json; empty when the label map is unknown).

Runs anywhere: the graph is float32 (built under the float32 policy whatever training used) and
``channels_last``, with no GPU-only op, so ``tf.saved_model.load`` works on a machine without a
GPU -- the reference recipe's NCHW export did not. ``SAVED/<N>/assets.extra/README.md`` documents
the REST request (``{"instances": [{"b64": "..."}]}``); :func:`serve_json` answers such a body the
way TF Serving does, for tests and for trying a request without a server.

Writes are all-or-nothing: the SavedModel is written to a hidden sibling (``SAVED/.tmp-...``,
which TF Serving ignores: it only loads numeric folders) and renamed into place. On GCS, where
a folder cannot be renamed, its files are copied with ``saved_model.pb`` last, so a server
polling the base path never finds a version folder whose graph is there but variables are not.
An existing version is refused unless ``--overwrite``; on GCS an overwrite deletes the old files
before the copy, so a model that is being served is better given a new ``--version``. With
``reuse`` (the pipeline's export step, which KFP retries), a version that
``assets.extra/export.json`` says was exported from the very checkpoint about to be exported is
kept as it is: a retry after a complete export is a no-op rather than a refusal.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re

from resnet_imagenet import config as config_lib
from resnet_imagenet import evaluation, preflight, storage
from resnet_imagenet.data import labels as labels_lib
from resnet_imagenet.errors import UserError

log = logging.getLogger(__name__)

SERVING_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "predict_images"
BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
TOP_K = 5
SAVED_MODEL_PB = "saved_model.pb"
README = "assets.extra/README.md"
PROVENANCE = "assets.extra/export.json"  # {"checkpoint": ..., "step": ...}: what was exported
_VERSION_RE = re.compile(r"^\d+$")


# --- the serving module ----------------------------------------------------------------------


def _serving_module(model, config: config_lib.TrainConfig, label_map: list[dict] | None):
    """A ``tf.Module`` holding the model, the label map and both signature functions."""
    import tensorflow as tf

    from resnet_imagenet.data import preprocessing

    size, num_classes = config.model.image_size, config.model.num_classes
    top_k = min(TOP_K, num_classes)
    # Index = label (1..N); index 0 is the unused label 0 of the TFRecords.
    synsets, texts = [""] * (num_classes + 1), [""] * (num_classes + 1)
    for row in label_map or []:
        if 1 <= row["label"] <= num_classes:
            synsets[row["label"]], texts[row["label"]] = row["synset"], row.get("text", "")

    class ResNetServing(tf.Module):
        def __init__(self):
            super().__init__(name="resnet_serving")
            self.model = model
            # String tensors have no GPU kernels: keep the label map on the host.
            with tf.device("/cpu:0"):
                self.synsets = tf.Variable(synsets, trainable=False, name="synsets")
                self.texts = tf.Variable(texts, trainable=False, name="texts")

        def _outputs(self, images):
            logits = self.model(images, training=False)
            probabilities = tf.nn.softmax(logits)
            top = tf.math.top_k(probabilities, k=top_k)
            top_classes = tf.cast(top.indices, tf.int64) + 1
            return {
                "classes": tf.argmax(logits, axis=-1, output_type=tf.int64) + 1,
                "probabilities": probabilities,
                "top5_classes": top_classes,
                "top5_probabilities": top.values,
                "top5_synsets": tf.gather(self.synsets, top_classes),
                "top5_texts": tf.gather(self.texts, top_classes),
            }

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
        def serve_bytes(self, image_bytes):
            return self._outputs(preprocessing.preprocess_eval_batch(image_bytes, size))

        @tf.function(input_signature=[
            tf.TensorSpec([None, size, size, 3], tf.uint8, name=IMAGES_INPUT)])
        def predict_images(self, images):
            return self._outputs(images)

    return ResNetServing()


# --- writing ---------------------------------------------------------------------------------


def _versions(export_dir: str) -> list[tuple[int, str]]:
    """``(version, folder name)`` of the numeric folders under ``export_dir``, lowest first
    (TF Serving reads ``0001`` as version 1 too)."""
    return sorted((int(n), n) for n in storage.listdir(export_dir) if _VERSION_RE.match(n))


def _serving_command(export_dir: str) -> str:
    if storage.is_remote(export_dir):  # the server reads GCS itself (give it credentials)
        return ("    docker run -p 8501:8501 --entrypoint tensorflow_model_server \\\n"
                "        tensorflow/serving --rest_api_port=8501 --model_name=resnet \\\n"
                f"        --model_base_path={export_dir}")
    return (f"    docker run -p 8501:8501 -v {export_dir}:/models/resnet -e MODEL_NAME=resnet \\\n"
            "        tensorflow/serving")


def _readme(config: config_lib.TrainConfig, restored: evaluation.Restored, version: int,
            export_dir: str, labelled: bool) -> str:
    size, classes = config.model.image_size, config.model.num_classes
    return f"""# {evaluation.describe(config)}, SavedModel version {version}

Exported by `resnet-imagenet export` from `{restored.checkpoint}` (step {restored.step}).
Input images are classified at {size}x{size} px; labels are 1..{classes} as in the
training TFRecords{"" if labelled else " (no label map was known: synsets and texts are empty)"}.

## Signatures

`serving_default`: input `image_bytes`, string [batch] of JPEG/PNG/GIF/BMP file bytes (decoded,
resized and centre-cropped in the graph).
`predict_images`: input `images`, uint8 [batch, {size}, {size}, 3], already preprocessed.

Outputs of both: `classes` int64 [batch]; `probabilities` float32 [batch, {classes}];
`top5_classes` int64, `top5_probabilities` float32, `top5_synsets` and `top5_texts` string,
each [batch, {min(TOP_K, classes)}].

## TensorFlow Serving

The base path is the folder that holds the version folders:

{_serving_command(export_dir)}

## KServe

    apiVersion: serving.kserve.io/v1beta1
    kind: InferenceService
    metadata:
      name: resnet
    spec:
      predictor:
        model:
          modelFormat:
            name: tensorflow
          storageUri: {export_dir}

KServe serves it at `http://<ingress>/v1/models/resnet:predict` (Host header: the
InferenceService's host), with the same request and answer as below.

## Request (REST, both servers)

Binary inputs travel base64-encoded in a JSON object with the single key `b64`; TF Serving
decodes it for any string input. With one input, `instances` lists its values directly, one
per image:

    {{"instances": [{{"b64": "<base64 of cat.jpg>"}}, {{"b64": "<base64 of dog.png>"}}]}}

    printf '{{"instances": [{{"b64": "%s"}}]}}' "$(base64 -w0 cat.jpg)" > request.json
    curl -s -X POST -d @request.json http://localhost:8501/v1/models/resnet:predict

Equivalent forms: `{{"instances": [{{"image_bytes": {{"b64": "..."}}}}]}}` (named) and
`{{"inputs": {{"image_bytes": [{{"b64": "..."}}]}}}}` (columnar, answered under `outputs`).
The `image_bytes` name also follows the `_bytes` convention of Google's AI Platform / Vertex AI
prediction. The answer has one object per image:

    {{"predictions": [{{"classes": 3, "top5_classes": [3, 8, ...],
                       "top5_probabilities": [0.91, 0.04, ...],
                       "top5_synsets": ["n01443537", ...], "top5_texts": ["goldfish, ...", ...],
                       "probabilities": [...]}}]}}

Preprocessed images go to the other signature:
`{{"signature_name": "predict_images", "instances": [<{size}x{size}x3 nested lists of 0..255>]}}`.

## Python

    import tensorflow as tf
    model = tf.saved_model.load("{export_dir}/{version}")
    serve = model.signatures["serving_default"]
    out = serve(image_bytes=tf.constant([open("cat.jpg", "rb").read()]))
    print(out["top5_texts"].numpy())
"""


def _publish(staging: str, target: str) -> None:
    """Move the finished SavedModel at ``staging`` to ``target`` (replacing an old one).

    A failure leaves the old version in place (local) or no version folder (GCS).
    """
    if not storage.is_remote(target):
        old = storage.temp_name(target) if storage.exists(target) else None
        if old:
            storage.rename(target, old, overwrite=False)
        try:
            storage.rename(staging, target, overwrite=False)
        except BaseException:
            if old:
                storage.rename(old, target, overwrite=False)
            raise
        if old:
            storage.rmtree(old)
        return
    storage.rmtree(target)
    files = sorted(storage.walk_files(staging),
                   key=lambda path: storage.basename(path) == SAVED_MODEL_PB)
    try:
        for path in files:
            relative = path[len(staging):].lstrip("/")
            storage.copy(path, storage.join(target, *relative.split("/")))
    except BaseException:
        storage.rmtree(target)  # saved_model.pb comes last: a server never loaded this copy
        raise


def exported_from(path: str) -> str | None:
    """The checkpoint a SavedModel version was exported from (``assets.extra/export.json``), or
    None when it does not say (exported before that file existed, or not complete)."""
    provenance = storage.join(path, *PROVENANCE.split("/"))
    if not storage.exists(provenance) or not storage.exists(storage.join(path, SAVED_MODEL_PB)):
        return None
    try:
        return json.loads(storage.read_text(provenance)).get("checkpoint")
    except (ValueError, AttributeError):
        return None


def export(model_dir: str, export_dir: str, checkpoint: str | None = None,
           overwrite: bool = False, version: int = 1, reuse: bool = False) -> str:
    """Export a checkpoint (default: the latest) of ``model_dir``; returns ``SAVED/<version>``.

    ``reuse``: an existing version exported from the same checkpoint is returned as it is.
    """
    import tensorflow as tf

    if version < 1:
        raise UserError(f"--version {version}: TF Serving versions are positive integers")
    export_dir = preflight.check_output_dir(export_dir, "--export-dir")
    versions = _versions(export_dir)
    same = [name for number, name in versions if number == version]  # "1" or "0001"
    target = storage.join(export_dir, same[0] if same else str(version))
    model_dir = storage.normalize(model_dir)
    if same and not overwrite:
        if reuse and exported_from(target) == evaluation.resolve_checkpoint(model_dir, checkpoint):
            log.info("%s was exported from %s already: kept", target, exported_from(target))
            return target
        free = max([number for number, _ in versions] + [version]) + 1
        raise UserError(f"{target} already exists: pass --overwrite to replace it, or "
                        f"--version {free} to add a new version")
    config = config_lib.load(model_dir)
    label_map = labels_lib.load(model_dir)
    model = evaluation.build_model(config)
    restored = evaluation.restore(model, config,
                                  evaluation.resolve_checkpoint(model_dir, checkpoint))
    module = _serving_module(model, config, label_map)
    signatures = {SERVING_SIGNATURE: module.serve_bytes, IMAGES_SIGNATURE: module.predict_images}
    staging = storage.temp_name(target)
    try:
        tf.saved_model.save(module, staging, signatures=signatures)
        storage.write_text(storage.join(staging, *README.split("/")),
                           _readme(config, restored, version, export_dir, label_map is not None))
        storage.write_text(storage.join(staging, *PROVENANCE.split("/")), json.dumps(
            {"checkpoint": restored.checkpoint, "step": restored.step}, indent=2) + "\n")
        _publish(staging, target)
    finally:
        storage.rmtree(staging)
    log.info("exported %s (step %d) to %s", restored.checkpoint, restored.step, target)
    return target


# --- reading ---------------------------------------------------------------------------------


def resolve_saved_model(path: str) -> str:
    """``path`` itself when it holds a SavedModel, else its highest numeric version folder."""
    path = storage.normalize(path)
    if storage.exists(storage.join(path, SAVED_MODEL_PB)):
        return path
    folders = [name for _, name in _versions(path)
               if storage.exists(storage.join(path, name, SAVED_MODEL_PB))]
    if not folders:
        raise UserError(f"no SavedModel at {path}: pass the --export-dir of "
                        "'resnet-imagenet export' (or one of its version folders)")
    return storage.join(path, folders[-1])


def load(path: str):
    """Load an exported model (``SAVED`` or ``SAVED/<version>``) with ``tf.saved_model.load``."""
    import tensorflow as tf

    return tf.saved_model.load(resolve_saved_model(path))


# --- the TF Serving REST request format ------------------------------------------------------


class _BadRequest(Exception):
    pass


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _decode_b64(value, dtype):
    """Replace ``{"b64": ...}`` leaves by their bytes; only string inputs may hold them."""
    if isinstance(value, list):
        return [_decode_b64(v, dtype) for v in value]
    if isinstance(value, dict):
        if not _is_b64(value) or dtype != "string":
            raise _BadRequest(f"JSON object {json.dumps(value)[:80]} is not a value of a "
                              f"{dtype} input")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError:
            raise _BadRequest("Unable to base64 decode") from None
    return value


def _tensor(name: str, value, spec):
    import tensorflow as tf

    try:
        tensor = tf.constant(_decode_b64(value, spec.dtype.name), dtype=spec.dtype)
    except (TypeError, ValueError) as exc:
        raise _BadRequest(f"input {name}: {evaluation.error_line(exc)}") from None
    if not spec.shape.is_compatible_with(tensor.shape):
        raise _BadRequest(f"input {name}: shape {tensor.shape} does not match {spec.shape}")
    return tensor


def _columns_from_instances(instances, specs: dict) -> dict:
    if not isinstance(instances, list) or not instances:
        raise _BadRequest("'instances' must be a non-empty list")

    def named(value) -> bool:
        return isinstance(value, dict) and not _is_b64(value)

    if not named(instances[0]):
        if len(specs) > 1:
            raise _BadRequest("instances is a plain list, but the signature has several inputs")
        if any(named(v) for v in instances):
            raise _BadRequest("'instances' mixes objects and values")
        return {next(iter(specs)): instances}
    columns: dict = {name: [] for name in specs}
    for index, instance in enumerate(instances):
        if not named(instance) or set(instance) != set(specs):
            raise _BadRequest(f"element {index} of 'instances' must have exactly the keys "
                              + ", ".join(sorted(specs)))
        for name in specs:
            columns[name].append(instance[name])
    return columns


def _columns_from_inputs(inputs, specs: dict) -> dict:
    if isinstance(inputs, dict) and not _is_b64(inputs):
        missing = sorted(set(specs) - set(inputs))
        if missing:
            raise _BadRequest(f"missing named input(s) {', '.join(missing)} in 'inputs'")
        return {name: inputs[name] for name in specs}
    if len(specs) > 1:
        raise _BadRequest("'inputs' is a plain value, but the signature has several inputs")
    return {next(iter(specs)): inputs}


def _json_value(name: str, array):
    """A numpy output as JSON: strings as text, or ``{"b64": ...}`` for ``*_bytes`` outputs."""
    if array.dtype != object:
        return array.tolist()

    def convert(value):
        if isinstance(value, list):
            return [convert(v) for v in value]
        if name.endswith("_bytes"):
            return {"b64": base64.b64encode(value).decode("ascii")}
        return value.decode("utf-8", errors="replace")

    return convert(array.tolist())


def serve_json(model, body) -> dict:
    """Answer a TF Serving REST ``:predict`` body as TF Serving would; errors as ``{"error"}``.

    ``model`` is a loaded SavedModel or its path; ``body`` a dict or JSON text. Follows TF
    Serving's documented and implemented rules (``json_tensor.cc``): optional
    ``signature_name``; exactly one of ``instances`` (row format: a list of values when the
    signature has one input, else of objects keyed by input name) or ``inputs`` (columnar);
    ``{"b64": ...}`` decoded for string inputs; the answer under ``predictions`` (one object per
    row, or bare values for a single output) or ``outputs``; string outputs as text unless their
    name ends in ``_bytes``.
    """
    import numpy as np
    import tensorflow as tf

    loaded = load(model) if isinstance(model, str) else model
    try:
        if isinstance(body, (str, bytes)):
            try:
                body = json.loads(body)
            except ValueError as exc:
                raise _BadRequest(f"JSON Parse error: {exc}") from None
        if not isinstance(body, dict):
            raise _BadRequest("the request body must be a JSON object")
        name = body.get("signature_name", SERVING_SIGNATURE)
        if name not in loaded.signatures:
            raise _BadRequest(f"Serving signature name: \"{name}\" not found in signature def")
        function = loaded.signatures[name]
        specs = function.structured_input_signature[1]
        if ("instances" in body) == ("inputs" in body):
            raise _BadRequest("the body needs exactly one of 'instances' or 'inputs'")
        row_format = "instances" in body
        columns = (_columns_from_instances(body["instances"], specs) if row_format
                   else _columns_from_inputs(body["inputs"], specs))
        tensors = {n: _tensor(n, value, specs[n]) for n, value in columns.items()}
        try:
            outputs = {n: np.asarray(t) for n, t in function(**tensors).items()}
        except tf.errors.InvalidArgumentError as exc:
            raise _BadRequest(evaluation.error_line(exc)) from None
    except _BadRequest as exc:
        return {"error": str(exc)}
    values = {n: _json_value(n, a) for n, a in outputs.items()}
    if not row_format:
        return {"outputs": values if len(values) > 1 else next(iter(values.values()))}
    rows = [{n: v[i] for n, v in values.items()} for i in range(len(next(iter(values.values()))))]
    return {"predictions": [row if len(row) > 1 else next(iter(row.values())) for row in rows]}


# --- CLI -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, metavar="MODEL",
                        help="model directory written by 'resnet-imagenet train' (local or gs://)")
    parser.add_argument("--export-dir", required=True, metavar="SAVED",
                        help="base path of the SavedModel versions (local or gs://); the model "
                             "goes to SAVED/<version>/")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="checkpoint prefix, e.g. MODEL/checkpoints/ckpt-5000 "
                             "(default: the latest)")
    parser.add_argument("--version", type=int, default=1,
                        help="version folder number, as TF Serving expects (default 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace SAVED/<version> when it exists")


def run(args: argparse.Namespace) -> int:
    preflight.check_command(reads={"--model-dir": args.model_dir},
                            writes={"--export-dir": args.export_dir})
    path = export(args.model_dir, args.export_dir, args.checkpoint, args.overwrite, args.version)
    print(f"SavedModel written to {path} (serving_default: JPEG/PNG bytes; "
          f"predict_images: uint8 images); see {storage.join(path, README)}")
    return 0
