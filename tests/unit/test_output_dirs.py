"""Output directories that cannot be one (a file, a path under a file, a folder this process
cannot write in): one line naming the flag, exit 2, before any work and with nothing written."""

from __future__ import annotations

import os

import pytest

from resnet_imagenet import cli, preflight
from resnet_imagenet.errors import UserError


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("mine")
    return path


def only_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_file_and_a_path_under_a_file_are_refused(a_file):
    with pytest.raises(UserError, match=f"^--out {a_file} is a file: choose a directory$"):
        preflight.check_output_dir(str(a_file), "--out")
    under = a_file / "sub" / "dir"
    with pytest.raises(UserError, match=f"^--out {under} is under {a_file}, which is a file: "
                                        "choose a directory elsewhere$"):
        preflight.check_output_dir(str(under), "--out")


def test_a_folder_it_cannot_write_in_is_refused(tmp_path, monkeypatch):
    # Root may write anywhere, so the permission answer is what os.access says it is.
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode: False if p == str(tmp_path) else real_access(p, mode))
    target = tmp_path / "new" / "out"
    with pytest.raises(UserError, match=f"^--out {target}: cannot write in {tmp_path} "
                                        r"\(permission denied\): choose a directory you can "
                                        "write in, or fix its permissions$"):
        preflight.check_output_dir(str(target), "--out")


def test_a_directory_or_a_new_path_passes(tmp_path):
    assert preflight.check_output_dir(str(tmp_path), "--out") == str(tmp_path)
    assert preflight.check_output_dir(str(tmp_path / "a" / "b"), "--out") == str(tmp_path / "a/b")
    assert os.listdir(tmp_path) == []  # checking creates nothing


def test_sample_data_under_a_file(a_file, capsys):
    assert cli.main(["sample-data", "--output-dir", str(a_file / "raw")]) == 2
    assert only_error_line(capsys) == (f"error: --output-dir {a_file / 'raw'} is under {a_file}, "
                                       "which is a file: choose a directory elsewhere")
    assert a_file.read_text() == "mine"


def test_sample_data_onto_a_file_even_with_overwrite(a_file, capsys):
    assert cli.main(["sample-data", "--output-dir", str(a_file), "--overwrite"]) == 2
    assert only_error_line(capsys) == f"error: --output-dir {a_file} is a file: choose a directory"
    assert a_file.read_text() == "mine"


def test_export_checks_its_directory_before_it_reads_the_model(a_file, tmp_path, capsys):
    # The model directory does not exist: the export directory is refused first.
    assert cli.main(["export", "--model-dir", str(tmp_path / "no-model"),
                     "--export-dir", str(a_file)]) == 2
    assert only_error_line(capsys) == f"error: --export-dir {a_file} is a file: choose a directory"


def test_run_local_workdir_under_a_file(a_file, capsys):
    assert cli.main(["run-local", "--workdir", str(a_file / "demo")]) == 2
    assert only_error_line(capsys) == (f"error: --workdir {a_file / 'demo'} is under {a_file}, "
                                       "which is a file: choose a directory elsewhere")
