#!/usr/bin/env bash
# End-to-end on a real cluster (not run in CI): apply an overlay of manifests/, check the RBAC
# it grants and the TensorBoard it serves, then run the compiled pipeline on the demo dataset
# through Kubeflow Pipelines and find the run's curves in TensorBoard.
#
# Needs: a cluster with Kubeflow Pipelines (>= 2.2 backend) and training-operator v1.9; the
# images pushed (`make images push`, see README.md, "Run on a cluster"); a KUBECONFIG whose user may apply
# the manifests and impersonate service accounts; Google credentials on this machine that can
# write the bucket (the demo data is uploaded from here); and the venv (`make install`).
#
#   KUBECONFIG=~/.kube/config \
#   RESNET_E2E_BUCKET=gs://my-bucket/scratch \
#   RESNET_E2E_GSA=resnet-imagenet@my-project.iam.gserviceaccount.com \
#   KFP_HOST=http://localhost:8080 \
#   tests/e2e/run_on_cluster.sh
#
# Optional: RESNET_E2E_OVERLAY (gke-gpu | generic), RESNET_E2E_NAMESPACE, RESNET_E2E_GPUS,
# RESNET_E2E_ACCELERATOR; tests/e2e/test_cluster_pipeline.py describes each. For KFP_HOST,
# `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80` reaches a standalone install;
# a multi-user install also needs its login (see the Kubeflow docs on kfp.Client).
# Extra arguments go to pytest, e.g. `-k rights` to check only the RBAC.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${KUBECONFIG:?set KUBECONFIG to the cluster to test}"
: "${RESNET_E2E_BUCKET:?set RESNET_E2E_BUCKET to a gs:// prefix the cluster may write}"
if [[ "${RESNET_E2E_OVERLAY:-gke-gpu}" == gke-gpu ]]; then
  : "${RESNET_E2E_GSA:?set RESNET_E2E_GSA to the Google service account for Workload Identity}"
fi
export KUBECONFIG RESNET_E2E_BUCKET

PY=.venv/bin/python
[[ -x "$PY" ]] || PY=python3
"$PY" manifests/generate.py --check
exec "$PY" -m pytest -m e2e -v tests/e2e/test_cluster_pipeline.py "$@"
