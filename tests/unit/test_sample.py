"""The demo dataset: the raw ILSVRC2012 layout, real JPEGs, tight ink boxes, deterministic."""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from resnet_imagenet.data import sample
from resnet_imagenet.errors import UserError


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_layout_counts_and_files(demo_raw):
    synsets = open(os.path.join(demo_raw, "synsets.txt")).read().split()
    assert synsets == [f"n{c:08d}" for c in range(10)]
    metadata = dict(line.split("\t") for line in
                    open(os.path.join(demo_raw, "metadata.txt")).read().splitlines())
    assert metadata["n00000003"] == "digit three"
    train = {s: sorted(os.listdir(os.path.join(demo_raw, "train", s))) for s in synsets}
    assert all(len(files) == 16 for files in train.values())  # 20 per class, 4 to validation
    assert train["n00000003"][0] == "n00000003_1.JPEG"
    validation = sorted(os.listdir(os.path.join(demo_raw, "validation")))
    assert len(validation) == 40
    assert validation[0] == "ILSVRC2012_val_00000001.JPEG"
    labels = open(os.path.join(demo_raw, "validation_labels.txt")).read().split()
    assert len(labels) == len(validation)
    assert sorted(set(labels)) == synsets
    for synset, files in train.items():
        boxes = sorted(os.listdir(os.path.join(demo_raw, "bounding_boxes", synset)))
        assert boxes == [f.replace(".JPEG", ".xml") for f in files]


def test_images_are_rgb_jpegs_and_boxes_hold_the_ink(demo_raw):
    synset_dir = os.path.join(demo_raw, "train", "n00000007")
    for name in sorted(os.listdir(synset_dir))[:5]:
        image = Image.open(os.path.join(synset_dir, name))
        assert image.format == "JPEG" and image.mode == "RGB"
        xml = ET.parse(os.path.join(demo_raw, "bounding_boxes", "n00000007",
                                    name.replace(".JPEG", ".xml"))).getroot()
        assert xml.find("filename").text == name[:-5]
        assert int(xml.find("size/width").text) == image.width
        assert int(xml.find("size/height").text) == image.height
        assert xml.find("object/name").text == "n00000007"
        box = [int(xml.find(f"object/bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
        assert 0 <= box[0] < box[2] < image.width and 0 <= box[1] < box[3] < image.height
        # The ink (dark pixels) lies inside the box; outside is background.
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        dark = grey < 110
        inside = np.zeros_like(dark)
        inside[box[1]:box[3] + 1, box[0]:box[2] + 1] = True
        assert dark[inside].sum() > 0.95 * dark.sum()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    sample.build(a, seed=3, per_class=3)
    sample.build(b, seed=3, per_class=3)
    sample.build(c, seed=4, per_class=3)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_refuses_non_empty_output_unless_overwrite(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty: .* --overwrite"):
        sample.build(str(out), per_class=2)
    assert os.listdir(out) == ["keep.txt"]
    sample.build(str(out), per_class=2, overwrite=True)
    assert "keep.txt" not in os.listdir(out)
    assert os.path.exists(out / "synsets.txt")
    # no staging directory left beside it
    assert os.listdir(tmp_path) == ["raw"]


def test_full_dataset_split_is_about_80_20(tmp_path):
    counts = sample.build(str(tmp_path / "raw"), seed=0)
    assert counts["train"] + counts["validation"] == 1797
    assert 0.18 < counts["validation"] / 1797 < 0.22
