"""The tests' PKI (see sandhub.bench.kwok_pki, shared with `sandhub bench k8s-exec`)."""

from sandhub.bench.kwok_pki import ClusterPKI

__all__ = ["ClusterPKI"]
