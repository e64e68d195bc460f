"""KFP v2 lightweight Python components: one thin file per pipeline step.

Each component body imports the library inside the function (KFP ships only the function's
source to the pod) and makes one call into it: a ``resnet-imagenet`` subcommand through
:func:`pipelines.params.run`, or a Python API function. Everything a step
decides is therefore reachable by the library's tests; the components only map KFP inputs and
artifacts to arguments.

Every step runs in the launcher image (CPU only, see :mod:`components.images`). No step asks for
a GPU: the train step creates a TFJob, and the GPUs go to that TFJob's pods.
"""

import functools

from kfp import dsl

from components.images import LAUNCHER_IMAGE

# The image already holds kfp (a dependency of this package): no pip install at run time, so
# steps start fast and work on clusters without access to PyPI.
step = functools.partial(dsl.component, base_image=LAUNCHER_IMAGE, install_kfp_package=False)
