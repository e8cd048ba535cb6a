//go:build tools

// Package tools pins the Flux controllers the lab builds: source-controller and
// helm-controller of Flux 2.7.
package tools

import (
	_ "github.com/fluxcd/helm-controller"
	_ "github.com/fluxcd/source-controller"
)
