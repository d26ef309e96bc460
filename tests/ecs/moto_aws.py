"""The tests' local AWS endpoint (see sandhub.bench.ecs_moto)."""

from sandhub.bench.ecs_moto import CLUSTER, EC2_PROVIDER, REGION, LocalAws as Aws, moto_server

__all__ = ["CLUSTER", "EC2_PROVIDER", "REGION", "Aws", "moto_server"]
