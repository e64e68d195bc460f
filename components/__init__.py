"""KFP v2 lightweight Python components: one thin file per pipeline step.

Each component body imports inside the function (KFP ships only the function's source to the
pod) and makes one call: a ``resnet-imagenet`` subcommand through :func:`pipelines.params.run`,
or one Python function of the library or of ``pipelines/`` (docs/pipeline.md says why).

Every step runs in the launcher image (CPU only, see :mod:`components.images`). No step asks for
a GPU: the train step creates a TFJob, and the GPUs go to that TFJob's pods.
"""

import functools

from kfp import dsl

from components.images import LAUNCHER_IMAGE

# The image already holds kfp (a dependency of this package): no pip install at run time, so
# steps start fast and work on clusters without access to PyPI.
step = functools.partial(dsl.component, base_image=LAUNCHER_IMAGE, install_kfp_package=False)
