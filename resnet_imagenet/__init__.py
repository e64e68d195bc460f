"""resnet-imagenet: train ResNet-50 on ImageNet on Kubernetes with Kubeflow Pipelines and TFJobs.

The library does the science; ``components/``, ``pipelines/`` and ``manifests/`` put it on a
cluster. Nothing in this package imports kfp.
"""

__version__ = "0.1.0"
