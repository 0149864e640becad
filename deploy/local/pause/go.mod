// The pod sandbox's pause program for the real node (no registry here to pull
// registry.k8s.io/pause from): sleeps, reaps children, exits on TERM/INT.
module pd-operator.dev/local/pause

go 1.26.0
