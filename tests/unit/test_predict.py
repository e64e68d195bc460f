"""``resnet-imagenet predict`` and ``bench predict`` on an exported model."""

from __future__ import annotations

import json

import pytest

from resnet_imagenet import cli, predict
from tests.support.model_dir import (  # noqa: F401  (fixtures)
    exported_model,
    raw_validation,
    trained_model,
)


@pytest.fixture(scope="module")
def images(trained_model, tmp_path_factory) -> dict[str, str]:
    """A validation JPEG; a PNG of exactly the pixels TensorFlow decodes from it; a greyscale
    JPEG; a file that is not an image."""
    import tensorflow as tf
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    jpeg = raw_validation(trained_model.raw_dir)[0][0]
    png = folder / "digit.png"
    png.write_bytes(tf.io.encode_png(tf.io.decode_jpeg(tf.io.read_file(jpeg), channels=3)).numpy())
    grey = folder / "grey.jpg"
    with Image.open(jpeg) as image:
        image.convert("L").save(grey, format="JPEG")
    text = folder / "notes.txt"
    text.write_text("not an image\n")
    return {"jpeg": jpeg, "png": str(png), "grey": str(grey), "text": str(text)}


@pytest.fixture(scope="module")
def served(exported_model):
    """The exported test model, loaded once for the Python API calls of this module."""
    import tensorflow as tf

    return tf.saved_model.load(exported_model)


def _check_top(top: list[dict], k: int) -> None:
    assert len(top) == k
    probabilities = [row["probability"] for row in top]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
    for row in top:
        assert 1 <= row["label"] <= 10
        assert row["synset"] == f"n{row['label'] - 1:08d}" and row["text"].startswith("digit ")


def test_png_grey_jpeg_and_a_non_image(exported_model, images, capsys):
    status = cli.main(["predict", "--model", exported_model, "--json", "--top-k", "3",
                       images["jpeg"], images["png"], images["grey"], images["text"]])

    assert status == 1  # one file failed
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in lines] == [images[k] for k in ("jpeg", "png", "grey", "text")]
    jpeg, png, grey, text = lines
    for result in (jpeg, png, grey):
        _check_top(result["top"], 3)
    # Same pixels, same answer: the PNG holds what the JPEG decodes to.
    assert [r["label"] for r in png["top"]] == [r["label"] for r in jpeg["top"]]
    assert [r["probability"] for r in png["top"]] == pytest.approx(
        [r["probability"] for r in jpeg["top"]], abs=1e-5)
    assert set(text) == {"file", "error"}
    assert images["text"] in text["error"] and "not a readable image" in text["error"]


def test_one_bad_file_in_a_batch_costs_only_its_own_result(served, images, tmp_path):
    missing = str(tmp_path / "missing.jpg")
    files = [images["jpeg"], images["text"], images["png"], missing, images["grey"]]

    batched = predict.predict(served, files, top_k=2, batch_size=2)
    alone = predict.predict(served, files, top_k=2, batch_size=1)

    assert [sorted(r) for r in batched] == [["file", "top"], ["error", "file"], ["file", "top"],
                                            ["error", "file"], ["file", "top"]]
    assert batched[3]["error"] == f"{missing} not found"
    for a, b in zip(batched, alone):
        if "top" in a:
            assert [r["label"] for r in a["top"]] == [r["label"] for r in b["top"]]


def test_text_output(exported_model, images, capsys):
    status = cli.main(["predict", "--model", exported_model, "--top-k", "2", images["grey"]])
    out = capsys.readouterr().out.splitlines()
    assert status == 0
    assert out[0] == images["grey"]
    assert len(out) == 3
    assert out[1].startswith("  1. ") and " label " in out[1] and " digit " in out[1]


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}", "{jpeg}"], "no SavedModel at"),
    (["--model", "{model}", "--top-k", "11", "{jpeg}"], "--top-k 11: use 1 to 10"),
])
def test_bad_arguments_are_one_line_errors(exported_model, images, tmp_path, capsys, args,
                                           message):
    values = {"missing": str(tmp_path / "nothing"), "model": exported_model,
              "jpeg": images["jpeg"]}
    status = cli.main(["predict", *[a.format(**values) for a in args]])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    (line,) = [x for x in captured.err.splitlines() if x.startswith("error:")]
    assert message in line


def test_bench_predict_reports_latency_and_throughput(exported_model, served, images, capsys):
    status = cli.main(["bench", "predict", "--model", exported_model, "--runs", "3"])

    out = capsys.readouterr().out
    assert status == 0
    assert "median" in out and "p90" in out and "images/s" in out
    result = json.loads(out.strip().splitlines()[-1])  # bench's final JSON line
    assert result["device"].startswith("CPU") and result["latency_calls"] == 3
    assert 0 < result["latency_ms_median"] <= result["latency_ms_p90"]
    assert result["images_per_second"] > 0 and result["batch_size"] == 32

    with_files = predict.bench_predict(served, batch_size=2, runs=2, warmup=0,
                                       images=[images["png"], images["jpeg"]])
    assert with_files["latency_calls"] == 2 and with_files["batch_size"] == 2
