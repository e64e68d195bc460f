"""``convert``: the demo dataset round trip, odd images, tasks, resuming, refusing bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from PIL import Image

from resnet_imagenet import cli
from resnet_imagenet.data import convert_bench, labels
from resnet_imagenet.data.tfrecord import read_records
from resnet_imagenet.errors import UserError
from tests.support.conversion import run_convert, tree
from tests.support.images import (cmyk_jpeg, decode, grey_jpeg, png_bytes, truncated_jpeg,
                                  undecodable_jpeg)


def shard_files(out) -> list[Path]:
    return sorted(p for p in Path(out).iterdir() if p.name.startswith(("train-", "validation-")))


@pytest.fixture(scope="module")
def clean(demo_raw, tmp_path_factory) -> Path:
    """One clean conversion of the demo dataset that other tests compare against."""
    out = tmp_path_factory.mktemp("clean") / "out"
    run_convert(demo_raw, out)
    return out


def expected_boxes(xml_path: Path) -> list[tuple[float, ...]]:
    root = ElementTree.parse(xml_path).getroot()
    width, height = float(root.findtext("size/width")), float(root.findtext("size/height"))
    return [(float(b.findtext("xmin")) / width, float(b.findtext("ymin")) / height,
             float(b.findtext("xmax")) / width, float(b.findtext("ymax")) / height)
            for b in root.iter("bndbox")]


def test_demo_dataset_converts_and_reads_back(demo_raw, clean):
    raw = Path(demo_raw)
    synsets = (raw / "synsets.txt").read_text().split()
    texts = dict(line.split("\t") for line in (raw / "metadata.txt").read_text().splitlines())
    val_labels = dict(zip(sorted(p.name for p in (raw / "validation").iterdir()),
                          (raw / "validation_labels.txt").read_text().split()))
    assert [p.name for p in shard_files(clean)] == [
        "train-00000-of-00004", "train-00001-of-00004", "train-00002-of-00004",
        "train-00003-of-00004", "validation-00000-of-00002", "validation-00001-of-00002"]

    seen = {}
    for shard in shard_files(clean):
        split = shard.name.split("-")[0]
        records = read_records(str(shard))
        assert records, shard.name
        if split == "train":  # classes are spread over the shards
            assert len({r["synset"] for r in records}) >= 5
        for r in records:
            if split == "train":
                path = raw / "train" / r["synset"] / r["filename"]
                assert r["boxes"] == [pytest.approx(b) for b in expected_boxes(
                    raw / "bounding_boxes" / r["synset"] / (path.stem + ".xml"))]
                assert r["boxes"]
            else:
                path = raw / "validation" / r["filename"]
                assert r["synset"] == val_labels[r["filename"]] and r["boxes"] == []
            assert r["encoded"] == path.read_bytes()  # plain JPEGs are stored as they are
            assert r["label"] == synsets.index(r["synset"]) + 1
            assert r["text"] == texts[r["synset"]]
            with Image.open(path) as image:
                assert (r["width"], r["height"]) == image.size
            assert (r["format"], r["colorspace"], r["channels"]) == ("JPEG", "RGB", 3)
            seen[f"{split}/{r['filename']}"] = True
    raw_files = {f"train/{p.name}" for p in (raw / "train").glob("*/*")} | \
        {f"validation/{p.name}" for p in (raw / "validation").iterdir()}
    assert set(seen) == raw_files and len(seen) == 200

    assert (clean / "labels.txt").read_text().split() == synsets
    manifest = json.loads((clean / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("train", "validation", "classes", "skipped", "schema")} == {
        "train": {"shards": 4, "images": 160, "shard_images": [40, 40, 40, 40]},
        "validation": {"shards": 2, "images": 40, "shard_images": [20, 20]},
        "classes": 10, "skipped": [], "schema": "inception"}
    assert [len(read_records(str(s))) for s in shard_files(clean)] == [40] * 4 + [20] * 2
    assert manifest["class_text"] == texts  # the label map's texts (resnet_imagenet.data.labels)
    assert labels.from_data_dir(str(clean))[3] == \
        {"label": 4, "synset": "n00000003", "text": "digit three"}
    assert not [p for p in clean.rglob("*") if p.name.startswith(".tmp-")]


def test_same_input_same_bytes_and_the_seed_matters(demo_raw, clean, tmp_path):
    run_convert(demo_raw, tmp_path / "again")
    assert tree(tmp_path / "again") == tree(clean)
    run_convert(demo_raw, tmp_path / "seed1", seed=1)
    first = read_records(str(tmp_path / "seed1" / "train-00000-of-00004"))
    assert [r["filename"] for r in first] != \
        [r["filename"] for r in read_records(str(clean / "train-00000-of-00004"))]


def test_two_tasks_together_equal_one_run(demo_raw, clean, tmp_path):
    out = tmp_path / "out"
    first = run_convert(demo_raw, out, num_tasks=2, task_index=0)
    assert first["written"] == ["train-00000-of-00004", "train-00002-of-00004",
                                "validation-00000-of-00002"]
    assert first["manifest"] is None and not (out / "manifest.json").exists()
    # --finalize refuses while task 1's shards are missing
    assert cli.main(["convert", "--output-dir", str(out), "--finalize"]) == 2
    second = run_convert(demo_raw, out, num_tasks=2, task_index=1)
    assert second["manifest"] is not None  # the task completing the last shard finalizes
    assert tree(out) == tree(clean)
    # a separate --finalize rewrites the same summary
    (out / "manifest.json").unlink()
    assert cli.main(["convert", "--output-dir", str(out), "--finalize"]) == 0
    assert tree(out) == tree(clean)


def test_interrupted_then_resumed_equals_clean(demo_raw, clean, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    # What a run killed at various moments leaves: shards missing, a shard without its
    # record (killed between the two renames), temporary files, no manifest.
    (out / "train-00001-of-00004").unlink()
    (out / "_shards" / "train-00001-of-00004.json").unlink()
    (out / "validation-00000-of-00002").unlink()
    (out / "_shards" / "train-00003-of-00004.json").unlink()
    (out / ".tmp-0123456789ab-train-00001-of-00004").write_bytes(b"half a shard")
    (out / "_shards" / ".tmp-0123456789ab-validation-00000-of-00002.json").write_text("{")
    (out / "manifest.json").unlink()
    (out / "labels.txt").unlink()
    result = run_convert(demo_raw, out)
    assert result["written"] == ["train-00001-of-00004", "train-00003-of-00004",
                                 "validation-00000-of-00002"]
    assert len(result["reused"]) == 3
    assert tree(out) == tree(clean)


def test_more_shards_than_images_gives_empty_shards(demo_raw, tmp_path):
    result = run_convert(demo_raw, tmp_path / "out", validation_shards=50)
    sizes = [len(read_records(str(p))) for p in shard_files(tmp_path / "out")
             if p.name.startswith("validation-")]
    assert len(sizes) == 50 and sum(sizes) == 40 and 0 in sizes
    assert result["manifest"]["validation"] == {"shards": 50, "images": 40,
                                                "shard_images": sizes}


def test_a_rerun_of_a_complete_output_writes_nothing(demo_raw, clean, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    before = {p: p.stat().st_mtime_ns for p in shard_files(out)}
    result = run_convert(demo_raw, out)
    assert result["written"] == [] and len(result["reused"]) == 6
    assert {p: p.stat().st_mtime_ns for p in shard_files(out)} == before
    assert tree(out) == tree(clean)


def test_other_configuration_is_refused_then_rebuilt_with_overwrite(demo_raw, clean, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    before = tree(out)
    with pytest.raises(UserError, match=r"holds shards of a different configuration \(seed 0 -> 1, "
                       r"train_shards 4 -> 3\): pass --overwrite"):
        run_convert(demo_raw, out, seed=1, train_shards=3)
    assert tree(out) == before  # refused before writing anything

    run_convert(demo_raw, tmp_path / "fresh", seed=1, train_shards=3)
    run_convert(demo_raw, out, seed=1, train_shards=3, overwrite=True)
    assert tree(out) == tree(tmp_path / "fresh")  # old-count shards and records are gone


def test_foreign_shards_are_refused(demo_raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000-of-00004").write_bytes(b"made by someone else")
    with pytest.raises(UserError, match="shards this converter did not record "
                       r"\(e.g. train-00000-of-00004\): pass --overwrite"):
        run_convert(demo_raw, out)
    run_convert(demo_raw, out, overwrite=True)
    assert (out / "train-00000-of-00004").read_bytes() != b"made by someone else"


@pytest.fixture
def odd_raw(demo_raw, tmp_path) -> Path:
    """The demo dataset plus ImageNet's kinds of odd files."""
    raw = tmp_path / "raw"
    shutil.copytree(demo_raw, raw)
    odd = {
        "n00000001_png.JPEG": png_bytes(width=90, height=70),
        "n00000001_cmyk.JPEG": cmyk_jpeg(width=64, height=48),
        "n00000001_grey.JPEG": grey_jpeg(width=50, height=40),
        "n00000001_cut.JPEG": truncated_jpeg(),
        "n00000001_empty.JPEG": b"",
        "n00000001_notes.txt": b"not an image\n",
        "n00000001_broken.JPEG": undecodable_jpeg(),
    }
    for name, data in odd.items():
        (raw / "train" / "n00000001" / name).write_bytes(data)
    return raw


def test_odd_images_are_repaired_or_skipped(odd_raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["convert", "--raw-dir", str(odd_raw), "--output-dir", str(out),
                     "--train-shards", "4", "--validation-shards", "2", "--workers", "1"]) == 0
    assert "skipped 3 files (reasons in manifest.json)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == [
        {"file": "train/n00000001/n00000001_cut.JPEG",
         "reason": "truncated JPEG: no end-of-image marker"},
        {"file": "train/n00000001/n00000001_empty.JPEG", "reason": "empty file"},
        {"file": "train/n00000001/n00000001_notes.txt",
         "reason": "not an image: unrecognised header"},
    ]
    assert manifest["train"]["images"] == 160 + 4
    records = {r["filename"]: r for s in shard_files(out) for r in read_records(str(s))}
    for name, size in (("n00000001_png.JPEG", (90, 70)), ("n00000001_cmyk.JPEG", (64, 48))):
        r = records[name]
        assert (r["width"], r["height"], r["channels"], r["colorspace"]) == (*size, 3, "RGB")
        assert decode(r["encoded"]).shape == (size[1], size[0], 3)
        assert r["encoded"] != (odd_raw / "train" / "n00000001" / name).read_bytes()
    grey = records["n00000001_grey.JPEG"]
    assert grey["encoded"] == (odd_raw / "train" / "n00000001" / "n00000001_grey.JPEG").read_bytes()
    assert (grey["channels"], grey["colorspace"]) == (1, "Grayscale")
    assert decode(grey["encoded"]).shape == (40, 50, 3)
    assert "n00000001_broken.JPEG" in records  # the header check alone cannot tell


def test_validate_decode_also_skips_undecodable_images(odd_raw, tmp_path):
    result = run_convert(odd_raw, tmp_path / "out", validate="decode")
    reasons = {s["file"].split("/")[-1]: s["reason"] for s in result["manifest"]["skipped"]}
    assert reasons["n00000001_broken.JPEG"].startswith("decode failed: ")
    assert len(reasons) == 4


def bad_input_cases(demo_raw: str, tmp: Path) -> dict:
    """name -> (arguments, the one-line error expected)"""
    def raw_without(*parts) -> str:
        raw = tmp / f"raw-{len(list(tmp.iterdir()))}"
        shutil.copytree(demo_raw, raw)
        for part in parts:
            shutil.rmtree(raw / part) if (raw / part).is_dir() else (raw / part).unlink()
        return str(raw)

    def raw_with(name: str, text: str) -> str:
        raw = raw_without()
        (Path(raw) / name).write_text(text)
        return raw

    def raw_with_empty_class() -> str:
        raw = raw_without("train/n00000004")
        (Path(raw) / "train/n00000004").mkdir()
        return raw

    labels = (Path(demo_raw) / "validation_labels.txt").read_text().split()
    return {
        "no train": (raw_without("train"), r"error: .*/train not found"),
        "no validation": (raw_without("validation"), r"error: .*/validation not found"),
        "label count": (raw_with("validation_labels.txt", "\n".join(labels[:-1])),
                        r"has 39 labels but .* holds 40 files"),
        "unknown wnid": (raw_with("validation_labels.txt", "\n".join(["n00000077"] + labels[1:])),
                         r"line 1: n00000077 .* is not one of the 10 classes"),
        "empty class": (raw_with_empty_class(), r"train/n00000004 is empty"),
    }


def test_bad_input_is_refused_with_one_line_before_writing(demo_raw, tmp_path, capsys):
    cases = bad_input_cases(demo_raw, tmp_path)
    for name, (raw, pattern) in cases.items():
        out = tmp_path / "out"
        status = cli.main(["convert", "--raw-dir", raw, "--output-dir", str(out),
                           "--train-shards", "4", "--validation-shards", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2, name
        assert len(err) == 1 and err[0].startswith("error: "), (name, err)
        assert re.search(pattern, err[0]), (name, err)
        assert not out.exists(), name


@pytest.mark.parametrize("args, message", [
    (["--train-shards", "0"], "--train-shards 0 is out of range"),
    (["--task-index", "2", "--num-tasks", "2"], "--task-index 2 --num-tasks 2"),
    (["--workers", "0"], "--workers 0"),
])
def test_bad_flags_are_refused(demo_raw, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert cli.main(["convert", "--raw-dir", demo_raw, "--output-dir", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # a fresh interpreter imports TensorFlow: seconds
def test_cli_subprocess_exits_2_with_one_line(tmp_path):
    raw = tmp_path / "raw"
    (raw / "validation").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "resnet_imagenet", "convert", "--raw-dir", str(raw),
         "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {raw}/train not found: the raw layout needs "
                                     "train/<wnid>/<images> (see 'resnet-imagenet convert --help')")
    assert not (tmp_path / "out").exists()


def test_benchmark_reports_both_rates(tmp_path, capsys):
    figures = convert_bench.bench(workers=1, limit=12, rounds=1)
    assert figures["images"] == 12
    assert figures["converter_images_per_s"] > 0 and figures["baseline_images_per_s"] > 0
    assert figures["ratio"] == pytest.approx(  # one round: the ratio of its two rates
        figures["converter_images_per_s"] / figures["baseline_images_per_s"])
    # a fresh command: a handful of images, then the whole (12-image) input
    assert 0 < figures["cold_start_s"] and figures["fresh_run_images"] == 12
    assert 0 < figures["fresh_run_s"]
    out = capsys.readouterr().out
    assert "ratio" in out and "cold start: a fresh 'convert --workers 1' of 10 small images" in out
