"""The PDDeployment API (group serving.pd-operator.dev)."""
