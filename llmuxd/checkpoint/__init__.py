"""Checkpoints: CRIU dumps of model trees, their manifests, and restore preparation."""
