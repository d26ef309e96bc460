"""The tests' real control plane (see sandhub.bench.kwok_cluster, shared with
`sandhub bench k8s-exec`)."""

from sandhub.bench.kwok_cluster import (
    FAKE_NODE_ANNOTATION, NODEGROUP, NODEGROUP_LABEL, NODEGROUP_TAINT, RUNTIME_CLASS, Binaries, ControlPlane, free_port,
)

__all__ = ["FAKE_NODE_ANNOTATION", "NODEGROUP", "NODEGROUP_LABEL", "NODEGROUP_TAINT", "RUNTIME_CLASS", "Binaries",
           "ControlPlane", "free_port"]
