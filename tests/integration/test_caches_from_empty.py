"""The KFP schema cache built from an empty RESNET_IMAGENET_CACHE while the GCS emulator runs.

A fresh machine's first `make test` did exactly this and failed: the emulator's proxy had been
put into the session's environment, so the `pip` that installs the schemas tunnelled to it.
"""

from __future__ import annotations

import pipeline_check


def test_the_schemas_install_from_empty_with_the_emulator_running(gcs_server, tmp_path,
                                                                 monkeypatch):
    cache = tmp_path / "cache"
    killed = cache / "kfp-schemas" / "2.17.0.tmp.killed"  # what a killed install leaves
    killed.mkdir(parents=True)
    (killed / "half-written").write_text("x")
    monkeypatch.setenv("RESNET_IMAGENET_CACHE", str(cache))
    version = pipeline_check.kfp_versions()["latest"]

    folder = pipeline_check.schemas(version)

    assert folder == str(cache / "kfp-schemas" / version)
    installed = sorted(p.name.removesuffix(".dist-info")
                       for p in (cache / "kfp-schemas" / version).iterdir()
                       if p.name.endswith(".dist-info"))
    assert installed == [f"kfp_kubernetes-{version}", f"kfp_pipeline_spec-{version}"]
    assert (cache / "kfp-schemas" / version / "kfp" / "pipeline_spec" /
            "pipeline_spec_pb2.py").is_file()
    assert sorted(p.name for p in (cache / "kfp-schemas").iterdir()) == [".lock", version]
