//go:build tools

// Package controlplane pins the upstream programs this module builds, and the upstream CRDs
// the tests install; it is never compiled. build.sh builds the programs as binaries, each run
// as its own process by up.sh. The Gateway API Inference Extension is here for its
// InferencePool CRD, read from the module cache (config/crd/bases/), never copied.
package controlplane

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "sigs.k8s.io/gateway-api-inference-extension/api/v1"
)
