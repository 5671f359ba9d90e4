#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kube-controller-manager from this module's pins into the
# binary cache, and prints the cache directory. Binaries already there that report the pinned
# versions are kept, so only the first run pays for the build.
#
# The cache lives outside the checkout (DEEPSEEK_CONTROLPLANE_BIN, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/deepseek-k8s/controlplane/<kubernetes version>) so that fresh
# clones reuse it. Concurrent callers wait on a lock in that directory.
#
# Usage: build.sh [--check]   (--check: only say, by the exit status, whether the cache is
# complete)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$here/go.mod")
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$here/go.mod")
bin=${DEEPSEEK_CONTROLPLANE_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/deepseek-k8s/controlplane/$k8s_version}
mkdir -p "$bin"

# Whether `$1 --version` prints the line $2. The whole output is read before it is searched:
# `grep -q` in a pipe exits at the first match, and under pipefail the SIGPIPE that etcd (which
# prints four lines) may then get would make a complete cache look stale and rebuild it.
reports() {
  local out
  out=$("$1" --version 2>/dev/null) || return 1
  grep -qx -- "$2" <<<"$out"
}

stamped() {
  [[ -x $bin/etcd && -x $bin/kube-apiserver && -x $bin/kube-controller-manager ]] &&
    reports "$bin/kube-apiserver" "Kubernetes $k8s_version" &&
    reports "$bin/kube-controller-manager" "Kubernetes $k8s_version" &&
    reports "$bin/etcd" "etcd Version: ${etcd_version#v}"
}

if [[ ${1:-} == --check ]]; then
  stamped
  exit
fi

exec 9>"$bin/.lock"
flock 9
if ! stamped; then
  command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }
  major=${k8s_version#v}; major=${major%%.*}
  minor=${k8s_version#v*.}; minor=${minor%%.*}
  ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done
  export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
  # A build cache of its own, removed once the binaries exist: Kubernetes leaves several GB
  # of it, which only a rebuild at these same pins would use, on a disk the Rust build needs.
  export GOCACHE="$bin/.gocache"
  start=$(date +%s)
  cd "$here"
  for target in etcd:go.etcd.io/etcd/server/v3 \
    kube-apiserver:k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager:k8s.io/kubernetes/cmd/kube-controller-manager; do
    name=${target%%:*}
    echo "build.sh: building $name" >&2
    go build -ldflags "$ldflags" -o "$bin/$name.partial" "${target#*:}"
    mv -f "$bin/$name.partial" "$bin/$name"
  done
  rm -rf "$GOCACHE"
  echo "build.sh: built in $(($(date +%s) - start)) s" >&2
  stamped || { echo "build.sh: the built binaries do not report $k8s_version / etcd $etcd_version" >&2; exit 1; }
fi
echo "$bin"
