#!/usr/bin/env bash
# Build the pinned Go tools the tests need, once per machine, from Go modules only.
#
#   tools/build.sh [--print-dir] [NAME...]    NAME: kubernetes etcd training-operator kwok
#                                             jobset trainer (default: all of them)
#
# Each tool lands in $CACHE/bin/<name>-<version>/ (CACHE defaults to ~/.cache/resnet-imagenet).
# A finished directory is never rebuilt; a version change in tools/versions.env gives a new
# directory. A build goes to a temporary directory that is renamed when complete, so an
# interrupted build leaves nothing half-written; the next run removes its leftovers.
#
# Tools that agree on the Kubernetes libraries share one Go module (the "k8s" group: the
# control plane, kwok, JobSet, Trainer, all on k8s.io/* of KUBERNETES_VERSION), so k8s.io/api,
# apimachinery and client-go compile once. training-operator (k8s.io 0.31) and etcd keep
# modules of their own. Every module is resolved and downloaded first, all at once in the
# background, while the CPU compiles the modules that are ready. CGO_ENABLED=0, -trimpath.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$here/versions.env"
CACHE=${RESNET_IMAGENET_CACHE:-$HOME/.cache/resnet-imagenet}
# GOTOOLCHAIN=local: an old Go fails here with our message instead of fetching a toolchain.
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
ALL=(kubernetes etcd kwok training-operator jobset trainer)

die() { echo "error: $*" >&2; exit 2; }

version_of() {
  case "$1" in
    kubernetes) echo "$KUBERNETES_VERSION" ;;
    etcd) echo "$ETCD_VERSION" ;;
    training-operator) echo "$TRAINING_OPERATOR_VERSION" ;;
    kwok) echo "$KWOK_VERSION" ;;
    jobset) echo "$JOBSET_VERSION" ;;
    trainer) echo "$TRAINER_VERSION" ;;
    *) die "unknown tool '$1': pick from ${ALL[*]}" ;;
  esac
}

dir_of() { echo "$CACHE/bin/$1-$(version_of "$1")"; }   # the cache directory of its pin

group_of() {  # the Go module a tool is built in
  case "$1" in
    kubernetes|kwok|jobset|trainer) echo k8s ;;
    *) echo "$1" ;;
  esac
}

check_go() {  # Go on PATH and at least GO_MIN_VERSION (the newest `go` line of the pinned go.mods)
  command -v go >/dev/null \
    || die "go not found on PATH: install Go >= $GO_MIN_VERSION (https://go.dev/dl) to build the test control plane ($*)"
  local have
  have=$(go env GOVERSION) ; have=${have#go}
  if [ "$(printf '%s\n%s\n' "$GO_MIN_VERSION" "$have" | sort -V | head -n1)" != "$GO_MIN_VERSION" ]; then
    die "go $have ($(command -v go)) is older than the $GO_MIN_VERSION that the pinned modules of tools/versions.env need: install Go >= $GO_MIN_VERSION (https://go.dev/dl) and put it first on PATH"
  fi
}

check_cache() {
  mkdir -p "$CACHE/bin" "$CACHE/work" 2>/dev/null && [ -w "$CACHE/bin" ] && [ -w "$CACHE/work" ] \
    || die "cannot write the cache directory $CACHE/bin: make it writable, or point RESNET_IMAGENET_CACHE at a folder you own"
}

new_module() {  # new_module DIR: an empty main module to build pinned dependencies in
  mkdir -p "$1" && (cd "$1" && go mod init resnet-imagenet.local/build)
}

module_gomod() {  # module_gomod MODULE@VERSION -> path of its go.mod in the module cache
  go mod download -json "$1" | python3 -c '
import json, sys
info = json.load(sys.stdin)
if info.get("Error"):
    sys.exit("error: cannot download " + sys.argv[1] + ": " + info["Error"])
print(info["GoMod"])' "$1"
}

# ---- resolving and downloading (network) ---------------------------------------------------

prepare_k8s() {  # $1: work dir; $2..: the tools of the group still to build
  local dir=$1 v=$KUBERNETES_VERSION staging=v0${KUBERNETES_VERSION#v1} gomod pkgs=() t
  new_module "$dir"
  shift
  for t in "$@"; do
    case "$t" in
      kubernetes) pkgs+=("k8s.io/kubernetes/cmd/kube-apiserver@$v"
                         "k8s.io/kubernetes/cmd/kube-controller-manager@$v"
                         "k8s.io/kubernetes/cmd/kube-scheduler@$v") ;;
      kwok) pkgs+=("sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION") ;;
      jobset) pkgs+=("sigs.k8s.io/jobset@$JOBSET_VERSION") ;;
      trainer) pkgs+=("github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager@$TRAINER_VERSION") ;;
    esac
  done
  # k8s.io/kubernetes replaces its staging modules by directories that its module zip lacks:
  # point each one at the published module of the matching v0.X.Y instead. The replacements
  # also hold every tool of the group to the same k8s.io/* version.
  gomod=$(module_gomod "k8s.io/kubernetes@$v")
  sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod" | while read -r m; do
    (cd "$dir" && go mod edit -replace "$m=$m@$staging")
  done
  (cd "$dir" && go mod edit -require "k8s.io/kubernetes@$v" && go get "${pkgs[@]}")
}

prepare_etcd() {
  new_module "$1"
  # The etcd binary's main is one call; the server module carries everything else.
  cat > "$1/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$1" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy)
}

prepare_training-operator() {
  new_module "$1"
  (cd "$1" && go get "github.com/kubeflow/training-operator/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION")
}

# ---- compiling (CPU) -------------------------------------------------------------------------

build_tool() {  # build_tool NAME WORKDIR OUTDIR
  local name=$1 dir=$2 out=$3 v minor ld="-s -w" p
  case "$name" in
    kubernetes)
      v=$KUBERNETES_VERSION; minor=${v#v1.}; minor=${minor%%.*}
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
      done
      (cd "$dir" && go build -trimpath -ldflags "$ld" -o "$out/" k8s.io/kubernetes/cmd/kube-apiserver \
         k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler) ;;
    etcd) (cd "$dir" && go build -trimpath -ldflags "$ld" -o "$out/etcd" .) ;;
    training-operator) (cd "$dir" && go build -trimpath -ldflags "$ld" -o "$out/training-operator" \
         github.com/kubeflow/training-operator/cmd/training-operator.v1) ;;
    kwok) (cd "$dir" && go build -trimpath -ldflags "$ld" -o "$out/kwok" sigs.k8s.io/kwok/cmd/kwok) ;;
    jobset) (cd "$dir" && go build -trimpath -ldflags "$ld" -o "$out/jobset-controller" sigs.k8s.io/jobset) ;;
    trainer) (cd "$dir" && go build -trimpath -ldflags "$ld" -o "$out/trainer-controller-manager" \
         github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager) ;;
  esac
}

install_tool() {  # install_tool NAME WORKDIR: build into a temporary directory, then rename it
  local name=$1 out tmp start=$SECONDS
  out=$(dir_of "$name")
  [ -d "$out" ] && return 0
  tmp=$(mktemp -d "$out.tmp.XXXXXX")
  echo "building $name into $out (first time on this machine)" >&2
  if ! build_tool "$name" "$2" "$tmp"; then rm -rf "$tmp"; return 1; fi
  # -T: never move into an existing directory (a build of the same version that finished
  # first): keep that one, drop this one.
  mv -T "$tmp" "$out" 2>/dev/null || rm -rf "$tmp"
  echo "built $name in $((SECONDS - start)) s" >&2
}

print_dir=false
if [ "${1:-}" = "--print-dir" ]; then print_dir=true; shift; fi
for n in "$@"; do version_of "$n" >/dev/null; done   # an unknown name: its error, exit 2
if $print_dir; then for n in "$@"; do dir_of "$n"; done; exit 0; fi
[ $# -gt 0 ] || set -- "${ALL[@]}"
missing=()
for n in "$@"; do out=$(dir_of "$n"); [ -d "$out" ] || missing+=("$n"); done
[ ${#missing[@]} -gt 0 ] || exit 0   # all built: nothing to do, Go not needed
check_go "${missing[*]}"
check_cache
exec 9>"$CACHE/build.lock"   # one build at a time per machine: a second caller waits, then finds it built
flock 9
# Under the lock nothing else builds: what a killed run left behind goes now.
rm -rf "$CACHE"/bin/*.tmp.* "$CACHE"/work/*
total=$SECONDS

# The groups still to build, each with its tools; k8s first: it is the longest to compile.
declare -A members=()
for n in "${missing[@]}"; do
  [ -d "$(dir_of "$n")" ] && continue   # a caller before us built it while we waited
  g=$(group_of "$n"); members[$g]="${members[$g]:-} $n"
done
order=()
for g in k8s etcd training-operator; do [ -n "${members[$g]:-}" ] && order+=("$g"); done
[ ${#order[@]} -gt 0 ] || exit 0

# Resolve and download every module at once: the network waits overlap each other and the
# compiles below.
declare -A prep_pid=() workdir=()
for g in "${order[@]}"; do
  workdir[$g]=$(mktemp -d "$CACHE/work/$g.XXXXXX")
  # shellcheck disable=SC2086
  ( "prepare_$g" "${workdir[$g]}" ${members[$g]} ) >"${workdir[$g]}.log" 2>&1 &
  prep_pid[$g]=$!
done
trap 'kill "${prep_pid[@]}" 2>/dev/null || true; rm -rf "$CACHE"/work/* "$CACHE"/bin/*.tmp.*' EXIT

failed=0
for g in "${order[@]}"; do
  start=$SECONDS
  if ! wait "${prep_pid[$g]}"; then
    echo "error: cannot resolve the Go modules of ${members[$g]# } (tools/versions.env); last lines of the log:" >&2
    tail -n 15 "${workdir[$g]}.log" | sed 's/^/  /' >&2
    failed=1; continue
  fi
  echo "resolved ${members[$g]# } ($((SECONDS - start)) s waited)" >&2
  for n in ${members[$g]}; do
    install_tool "$n" "${workdir[$g]}" || { echo "error: building $n failed (output above)" >&2; failed=1; }
  done
done
[ "$failed" = 0 ] || exit 1
echo "built ${missing[*]} in $((SECONDS - total)) s" >&2
