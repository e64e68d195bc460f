"""Shared fixtures. TensorFlow runs for real everywhere; models and images are kept tiny."""

from __future__ import annotations

import os

# Before TensorFlow is imported anywhere: quiet logs, no GPU even where one exists, and no
# thread pools larger than CI's 2 cores.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

pytest_plugins = ["tests.support.gcs", "tests.support.model_dir", "tests.support.cluster"]

# Under pytest-xdist (`make test`: -n auto --dist loadgroup) a worker runs whole groups: a test
# module is one group, so its module-scoped fixtures (a full run-local, a trained model) run
# once; modules that share an expensive session fixture are one group, so only one worker starts
# it. (Checked per module: a module goes where any of its tests needs the fixture.)
SHARED_SESSION_FIXTURES = {
    "control_plane": "control-plane",  # etcd, the API server, controllers, operators (~15 s)
    "trained_model": "trained-model",  # a tiny ResNet trained and checkpointed
    "exported_model": "trained-model",
    "resnet34_checkpoint": "trained-model",
}


@pytest.hookimpl(wrapper=True)  # around every other implementation: before xdist reads groups
def pytest_collection_modifyitems(items: list[pytest.Item]):
    shared_by_module: dict[str, set[str]] = {}
    for item in items:
        shared = shared_by_module.setdefault(item.nodeid.split("::", 1)[0], set())
        shared.update(SHARED_SESSION_FIXTURES[name] for name in getattr(item, "fixturenames", ())
                      if name in SHARED_SESSION_FIXTURES)
    # One group per module; "control-plane" wins over "trained-model" where a module needs both.
    group_of_module = {module: min(shared) if shared else module
                       for module, shared in shared_by_module.items()}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group_of_module[item.nodeid.split("::", 1)[0]]))
    return (yield)


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> str:
    """A small demo dataset in the raw ImageNet layout (20 images per class, 10 classes)."""
    from resnet_imagenet.data import sample

    out = str(tmp_path_factory.mktemp("raw") / "raw")
    sample.build(out, seed=0, per_class=20)
    return out


@pytest.fixture
def tf_data_service():
    """An in-process tf.data service (one dispatcher, one worker) on loopback; yields its address."""
    import tensorflow as tf

    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    address = dispatcher.target.split("://")[1]
    worker = service.WorkerServer(service.WorkerConfig(
        dispatcher_address=address, worker_address="127.0.0.1:%port%", port=0))
    try:
        yield address
    finally:
        worker._stop()
        dispatcher._stop()
