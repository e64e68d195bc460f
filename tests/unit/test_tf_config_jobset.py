"""TF_CONFIG under Kubeflow Trainer v2, built by the trainer from what JobSet gives each pod.

The environment below is that of a pod of the ``resnet-imagenet-tensorflow`` runtime for a
TrainJob ``resnet-train-0a1b2c3d4e5f`` with numNodes 3, with the names read off the pods the real
controllers made (Trainer v2.3.0, JobSet v0.12.0, kube-controller-manager 1.36; tests/integration/
test_launch_cluster.py does it on every run): the Job controller adds ``JOB_COMPLETION_INDEX``
(from the pod label ``batch.kubernetes.io/job-completion-index``); JobSet labels the pods
``jobset.sigs.k8s.io/jobset-name`` (the TrainJob's name), ``.../replicatedjob-name`` (``node``) and
``.../job-index`` (``0``), which the runtime copies into the environment; pod ``i`` gets the
hostname ``resnet-train-...-node-0-<i>`` and the subdomain ``resnet-train-...``, the name of
JobSet's headless Service.
"""

from __future__ import annotations

import json

import pytest

from resnet_imagenet.errors import UserError
from resnet_imagenet.launch import local
from resnet_imagenet.training import strategy

JOBSET = "resnet-train-0a1b2c3d4e5f"


def pod_env(index: int, nodes: int = 3, **extra) -> dict:
    env = {
        "JOB_COMPLETION_INDEX": str(index),
        "JOBSET_NAME": JOBSET,
        "JOBSET_REPLICATED_JOB": "node",
        "JOBSET_JOB_INDEX": "0",
        "RESNET_IMAGENET_NUM_NODES": str(nodes),
        "HOSTNAME": f"{JOBSET}-node-0-{index}",
    }
    env.update(extra)
    return env


def test_every_pod_gets_the_same_cluster_and_its_own_index():
    configs = [json.loads(strategy.tf_config_from_jobset(pod_env(i))) for i in range(3)]
    workers = [f"{JOBSET}-node-0-{i}.{JOBSET}:2222" for i in range(3)]
    for index, config in enumerate(configs):
        assert config == {"cluster": {"worker": workers},
                          "task": {"type": "worker", "index": index},
                          "environment": "cloud"}
        # Each pod's own address is its hostname under the JobSet's subdomain.
        assert workers[index].startswith(pod_env(index)["HOSTNAME"] + ".")


def test_the_shape_is_the_local_backends_and_the_operators_byte_for_byte():
    """The same JSON, key order and compact separators included, as the local backend writes
    (and training-operator v1.9 injects), for the same workers."""
    built = strategy.tf_config_from_jobset(pod_env(1))
    workers = json.loads(built)["cluster"]["worker"]
    assert built == local.tf_config(workers, "worker", 1)
    cluster = strategy.cluster_from_env({"TF_CONFIG": built})
    assert (cluster.num_workers, cluster.worker_id, cluster.is_chief) == (3, 1, False)


def test_a_subdomain_set_by_the_runtime_is_used():
    built = json.loads(strategy.tf_config_from_jobset(pod_env(0, JOBSET_SUBDOMAIN="tf")))
    assert built["cluster"]["worker"][0] == f"{JOBSET}-node-0-0.tf:2222"


def test_ensure_sets_it_only_when_absent():
    env = pod_env(2)
    strategy.ensure_tf_config(env)
    assert json.loads(env["TF_CONFIG"])["task"] == {"type": "worker", "index": 2}
    given = {**pod_env(0), "TF_CONFIG": '{"cluster": {}}'}
    strategy.ensure_tf_config(given)
    assert given["TF_CONFIG"] == '{"cluster": {}}'  # a TF_CONFIG someone set always wins
    outside = {"JOB_COMPLETION_INDEX": "0"}  # any Indexed Job, not one of our runtime
    strategy.ensure_tf_config(outside)
    assert "TF_CONFIG" not in outside


@pytest.mark.parametrize("env, message", [
    (pod_env(0, JOBSET_NAME=""), "RESNET_IMAGENET_NUM_NODES is set but JOBSET_NAME is not"),
    ({"RESNET_IMAGENET_NUM_NODES": "2"},
     "RESNET_IMAGENET_NUM_NODES is set but JOB_COMPLETION_INDEX, JOBSET_NAME, "
     "JOBSET_REPLICATED_JOB, JOBSET_JOB_INDEX is not"),
    (pod_env(3), "JOB_COMPLETION_INDEX=3 is out of range for RESNET_IMAGENET_NUM_NODES=3"),
    (pod_env(0, nodes="two"), "RESNET_IMAGENET_NUM_NODES='two' is not a whole number"),
])
def test_an_inconsistent_environment_is_one_line(env, message):
    with pytest.raises(UserError) as caught:
        strategy.tf_config_from_jobset(env)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
