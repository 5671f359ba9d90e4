#!/usr/bin/env bash
# Starts a Kubernetes control plane on loopback for the e2e suite and leaves it running:
# etcd, kube-apiserver (RBAC, service-account signing keys, client-certificate identities) and
# kube-controller-manager (the controllers that act on what the operator creates). Each
# upstream component runs as its own process. There is no kubelet; the suite's node agent
# plays that part.
#
# Prints one line, `KUBECONFIG=<absolute path>`, naming an admin kubeconfig. Everything else
# (certificates, logs, pid files, etcd data) lives in the state directory, the kubeconfig's
# directory, which e2e/controlplane/down.sh takes to stop exactly what this started.
#
# Usage: up.sh [STATE_DIR]    (default: a new directory under ${TMPDIR:-/tmp})
# Environment:
#   DEEPSEEK_CONTROLPLANE_OWNER_PID  stop the control plane (down.sh) once this process exits,
#                                    so a killed test run leaves nothing behind
#   DEEPSEEK_CONTROLPLANE_BIN        binary cache directory (see build.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

bin=$("$here/build.sh")
state=${1:-$(mktemp -d "${TMPDIR:-/tmp}/deepseek-controlplane.XXXXXX")}
mkdir -p "$state"
state=$(cd "$state" && pwd)
pki=$state/pki
mkdir -p "$pki" "$state/pids" "$state/logs"
if compgen -G "$state/pids/*.pid" >/dev/null; then
  echo "up.sh: $state already holds a control plane; run down.sh $state first" >&2
  exit 1
fi

fail() {
  echo "up.sh: $*" >&2
  for log in "$state"/logs/*.log; do
    [[ -s $log ]] || continue
    echo "--- last lines of $log" >&2
    tail -n 20 "$log" >&2
  done
  DEEPSEEK_CONTROLPLANE_KEEP=1 "$here/down.sh" "$state" >&2 || true
  exit 1
}
trap 'fail "failed at line $LINENO"' ERR

# Ports: random ones that nothing listens on, below the kernel's ephemeral range so that
# outgoing connections do not take them meanwhile.
picked=" "
free_port() {
  local used p
  used=$(tail -q -n +2 /proc/net/tcp /proc/net/tcp6 2>/dev/null |
    while read -r _ addr _; do echo $((16#${addr##*:})); done | sort -u)
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    if ! grep -qx "$p" <<<"$used" && [[ $picked != *" $p "* ]]; then
      picked+="$p "
      echo "$p"
      return 0
    fi
  done
  return 1
}
etcd_port=$(free_port)
etcd_peer_port=$(free_port)
api_port=$(free_port)
kcm_port=$(free_port)

# Identities: one CA signs the apiserver's serving certificate and the client certificates
# (admin in system:masters; the controller manager as the user its bootstrap RBAC names); a
# second CA signs the front proxy's client certificate.
# Service-account tokens are signed with their own key pair.
openssl_quiet() { openssl "$@" 2>>"$state/openssl.out"; }
new_ca() { # name
  openssl_quiet req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -keyout "$pki/$1.key" -out "$pki/$1.crt" -subj "/CN=deepseek-e2e-$1" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}
new_ca ca
new_ca front-proxy-ca
issue() { # ca name subject extendedKeyUsage [subjectAltName]
  local ca=$1 name=$2 subject=$3 usage=$4 san=${5:-}
  openssl_quiet req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$pki/$name.key" -out "$pki/$name.csr" -subj "$subject"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [[ -z $san ]] || echo "subjectAltName=$san"
  } >"$pki/$name.ext"
  openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" \
    -CAcreateserial -days 3650 -out "$pki/$name.crt" -extfile "$pki/$name.ext"
}
issue ca apiserver "/CN=kube-apiserver" serverAuth \
  "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
issue ca admin "/O=system:masters/CN=deepseek-e2e-admin" clientAuth
issue ca kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
# The aggregation layer's front proxy, so that components delegating authentication find a
# complete configuration.
issue front-proxy-ca front-proxy-client "/CN=front-proxy-client" clientAuth
openssl_quiet genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
openssl_quiet pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

kubeconfig() { # file user
  cat >"$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
  - name: deepseek-e2e
    cluster:
      server: https://127.0.0.1:$api_port
      certificate-authority: $pki/ca.crt
users:
  - name: $2
    user:
      client-certificate: $pki/$2.crt
      client-key: $pki/$2.key
contexts:
  - name: $2@deepseek-e2e
    context:
      cluster: deepseek-e2e
      user: $2
current-context: $2@deepseek-e2e
KUBECONFIG
}
kubeconfig "$state/admin.kubeconfig" admin
kubeconfig "$state/kube-controller-manager.kubeconfig" kube-controller-manager

# Components. Pid files are named NN-name.pid with the order to start in; down.sh stops them
# in reverse. Each records the pid and the executable, so a reused pid is never signalled.
start() { # order name binary args...
  local order=$1 name=$2
  shift 2
  "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo "$! $1" >"$state/pids/$order-$name.pid"
}
alive() { # name
  local pid exe
  read -r pid exe <"$state"/pids/*-"$1".pid
  [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$exe" ]]
}
# Polls a readiness check with a bound; fails early when the component has exited.
wait_until() { # seconds component what command...
  local seconds=$1 name=$2 what=$3
  shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    alive "$name" || fail "$name exited before $what; see $state/logs/$name.log"
    ((SECONDS < deadline)) || fail "$name: no $what within ${seconds}s"
    sleep 0.2
  done
}
admin_curl() {
  curl -fsS --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$api_port$1"
}

start 10 etcd "$bin/etcd" --name=e2e --data-dir="$state/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" \
  --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster="e2e=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync --log-level=warn
etcd_healthy() { curl -fsS --max-time 5 "http://127.0.0.1:$etcd_port/health" | grep -q '"health":"true"'; }
wait_until 120 etcd "health" etcd_healthy

start 20 kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$pki/front-proxy-client.crt" \
  --proxy-client-key-file="$pki/front-proxy-client.key" \
  --authorization-mode=RBAC \
  --enable-admission-plugins=OwnerReferencesPermissionEnforcement \
  --service-cluster-ip-range=10.96.0.0/16 \
  --endpoint-reconciler-type=none \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --profiling=false --v=1
apiserver_ready() { [[ $(admin_curl /readyz) == ok ]]; }
wait_until 240 kube-apiserver "/readyz" apiserver_ready

# The controllers that act on what the operator creates, each with its own service-account
# credentials (the bootstrap RBAC roles system:controller:*).
start 30 kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig="$state/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig="$state/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig="$state/kube-controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$kcm_port" --cert-dir="$state/kube-controller-manager" \
  --controllers=statefulset-controller,deployment-controller,replicaset-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,disruption-controller,root-ca-certificate-publisher-controller \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$pki/sa.key" \
  --root-ca-file="$pki/ca.crt" \
  --leader-elect=false --profiling=false --v=1
kcm_healthy() { [[ $(curl -ksS --max-time 5 "https://127.0.0.1:$kcm_port/healthz") == ok ]]; }
wait_until 120 kube-controller-manager "/healthz" kcm_healthy
# The service-account controller has run once the default namespace has its account.
wait_until 120 kube-controller-manager "default service account" \
  admin_curl /api/v1/namespaces/default/serviceaccounts/default

if [[ -n ${DEEPSEEK_CONTROLPLANE_OWNER_PID:-} ]]; then
  setsid bash -c 'tail --pid="$1" -f /dev/null; exec "$2" "$3"' owner-watch \
    "$DEEPSEEK_CONTROLPLANE_OWNER_PID" "$here/down.sh" "$state" \
    >>"$state/logs/down.log" 2>&1 </dev/null &
  echo "$! $(readlink /proc/$$/exe)" >"$state/pids/00-owner-watch.pid"
fi

trap - ERR
echo "KUBECONFIG=$state/admin.kubeconfig"
