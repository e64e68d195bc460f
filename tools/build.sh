#!/usr/bin/env bash
# Build the pinned Go tools the tests need, once per machine, from Go modules only.
#
#   tools/build.sh [--print-dir] [NAME...]    NAME: kubernetes etcd training-operator kwok
#                                             jobset trainer (default: all of them)
#
# Each tool lands in $CACHE/bin/<name>-<version>/ (CACHE defaults to ~/.cache/resnet-imagenet).
# A finished directory is never rebuilt; a version change in tools/versions.env gives a new
# directory. A build goes to a temporary directory that is renamed when complete, so an
# interrupted build leaves nothing half-written. CGO_ENABLED=0, -trimpath, version ldflags.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$here/versions.env"
CACHE=${RESNET_IMAGENET_CACHE:-$HOME/.cache/resnet-imagenet}
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

dir_of() {  # dir_of NAME -> the cache directory for its pinned version
  case "$1" in
    kubernetes) echo "$CACHE/bin/kubernetes-$KUBERNETES_VERSION" ;;
    etcd) echo "$CACHE/bin/etcd-$ETCD_VERSION" ;;
    training-operator) echo "$CACHE/bin/training-operator-$TRAINING_OPERATOR_VERSION" ;;
    kwok) echo "$CACHE/bin/kwok-$KWOK_VERSION" ;;
    jobset) echo "$CACHE/bin/jobset-$JOBSET_VERSION" ;;
    trainer) echo "$CACHE/bin/trainer-$TRAINER_VERSION" ;;
    *) echo "error: unknown tool '$1': pick from kubernetes etcd training-operator kwok jobset trainer" >&2; return 2 ;;
  esac
}

module_gomod() {  # module_gomod MODULE@VERSION -> path of its go.mod in the module cache
  go mod download -json "$1" | python3 -c '
import json, sys
info = json.load(sys.stdin)
if info.get("Error"):
    sys.exit("error: cannot download " + sys.argv[1] + ": " + info["Error"])
print(info["GoMod"])' "$1"
}

new_module() {  # new_module DIR: an empty main module to build a pinned dependency in
  mkdir -p "$1" && (cd "$1" && go mod init resnet-imagenet.local/build >/dev/null 2>&1)
}

build_kubernetes() {  # $1: output dir, $2: work dir
  local v=$KUBERNETES_VERSION staging=v0${KUBERNETES_VERSION#v1} gomod minor
  gomod=$(module_gomod "k8s.io/kubernetes@$v")
  new_module "$2"
  # k8s.io/kubernetes replaces its staging modules by directories that its module zip lacks:
  # point each one at the published module of the matching v0.X.Y instead.
  sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod" | while read -r m; do
    (cd "$2" && go mod edit -replace "$m=$m@$staging")
  done
  (cd "$2" && go mod edit -require "k8s.io/kubernetes@$v" \
     && go get "k8s.io/kubernetes/cmd/kube-apiserver@$v" "k8s.io/kubernetes/cmd/kube-controller-manager@$v" \
               "k8s.io/kubernetes/cmd/kube-scheduler@$v")
  minor=${v#v1.}; minor=${minor%%.*}
  local ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$2" && go build -trimpath -ldflags "$ld" -o "$1/" k8s.io/kubernetes/cmd/kube-apiserver \
     k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler)
}

build_etcd() {
  new_module "$2"
  # The etcd binary's main is one call; the server module carries everything else.
  cat > "$2/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$2" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy \
     && go build -trimpath -ldflags "-s -w" -o "$1/etcd" .)
}

build_plain() {  # build_plain OUT WORK MODULE VERSION BINARY PACKAGE [LDFLAGS]
  new_module "$2"
  (cd "$2" && go get "$6@$4" && go build -trimpath -ldflags "-s -w ${7:-}" -o "$1/$5" "$6")
}

build_one() {
  local name=$1 out tmp work
  out=$(dir_of "$name")
  [ -d "$out" ] && return 0
  mkdir -p "$CACHE/bin" "$CACHE/work"
  tmp=$(mktemp -d "$out.tmp.XXXXXX")
  work=$(mktemp -d "$CACHE/work/$name.XXXXXX")
  local start=$SECONDS
  echo "building $name into $out (first time on this machine)" >&2
  case "$name" in
    kubernetes) build_kubernetes "$tmp" "$work" ;;
    etcd) build_etcd "$tmp" "$work" ;;
    training-operator) build_plain "$tmp" "$work" github.com/kubeflow/training-operator \
        "$TRAINING_OPERATOR_VERSION" training-operator \
        github.com/kubeflow/training-operator/cmd/training-operator.v1 ;;
    kwok) build_plain "$tmp" "$work" sigs.k8s.io/kwok "$KWOK_VERSION" kwok sigs.k8s.io/kwok/cmd/kwok ;;
    jobset) build_plain "$tmp" "$work" sigs.k8s.io/jobset "$JOBSET_VERSION" jobset-controller \
        sigs.k8s.io/jobset ;;
    trainer) build_plain "$tmp" "$work" github.com/kubeflow/trainer/v2 "$TRAINER_VERSION" \
        trainer-controller-manager github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager ;;
  esac
  # -T: never move into an existing directory (a build of the same version that finished
  # first, e.g. by a caller from before the lock): keep that one, drop this one.
  mv -T "$tmp" "$out" 2>/dev/null || rm -rf "$tmp"
  rm -rf "$work"
  echo "built $name in $((SECONDS - start)) s" >&2
}

if [ "${1:-}" = "--print-dir" ]; then shift; for n in "$@"; do dir_of "$n"; done; exit 0; fi
[ $# -gt 0 ] || set -- kubernetes etcd kwok training-operator jobset trainer
missing=()
for n in "$@"; do out=$(dir_of "$n") || exit 2; [ -d "$out" ] || missing+=("$n"); done
[ ${#missing[@]} -gt 0 ] || exit 0   # all built: nothing to do, Go not needed
command -v go >/dev/null || { echo "error: go not found on PATH: install Go >= 1.26 (https://go.dev/dl) to build the test control plane (${missing[*]})" >&2; exit 2; }
mkdir -p "$CACHE"
exec 9>"$CACHE/build.lock"   # one build at a time per machine: a second caller waits, then finds it built
flock 9
for n in "${missing[@]}"; do build_one "$n"; done
