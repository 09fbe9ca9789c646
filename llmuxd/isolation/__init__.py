"""Isolation of model process trees (sessions now; cgroups, namespaces, seccomp)."""
