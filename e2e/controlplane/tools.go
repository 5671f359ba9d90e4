//go:build tools

// Package controlplane pins the upstream programs this module builds; it is never compiled.
// build.sh builds them as binaries, each run as its own process by up.sh.
package controlplane

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
