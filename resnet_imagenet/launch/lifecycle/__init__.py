"""The lifecycle of a cluster job, the same for every backend: submit (or re-attach), follow,
stream, clean up. It reaches a backend only through
:class:`~resnet_imagenet.launch.backend.ClusterBackend`::

    from resnet_imagenet.launch import lifecycle, tfjob
    status = lifecycle.launch(tfjob.BACKEND, tfjob.TFJobOptions(...), timeout=3600)

Modules: ``client`` (connection, API errors as one-line UserErrors), ``job`` (one job on the API
server, its deletion), ``submit`` (create or re-attach, the owner), ``wait`` (follow +
diagnose), ``restarts`` (a crash loop stopped), ``logs`` (the chief's log, the failed
replicas'), ``run`` (:func:`launch`).
"""

from resnet_imagenet.launch.lifecycle.job import (DEFAULT_API_OUTAGE_TIMEOUT, DEFAULT_DELETE_WAIT,
                                                  DEFAULT_LOG_TAIL, DEFAULT_POLL_INTERVAL,
                                                  DEFAULT_START_TIMEOUT, JobRun)
from resnet_imagenet.launch.lifecycle.restarts import DEFAULT_MAX_RESTARTS
from resnet_imagenet.launch.lifecycle.run import launch

__all__ = ["DEFAULT_API_OUTAGE_TIMEOUT", "DEFAULT_DELETE_WAIT", "DEFAULT_LOG_TAIL",
           "DEFAULT_MAX_RESTARTS", "DEFAULT_POLL_INTERVAL", "DEFAULT_START_TIMEOUT", "JobRun",
           "launch"]
