"""Fixtures of the ECS backend's tests: one moto server per session on
loopback, reset before every test, with a VPC, a subnet, a security group and
a cluster with FARGATE, FARGATE_SPOT and an EC2 capacity provider."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ecs.moto_aws import Aws, moto_server


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        # The backend's own client reads credentials the usual way: fake ones
        # for moto, so real ones are never sent anywhere.
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_SESSION_TOKEN", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        with moto_server() as local:
            yield local.endpoint


@pytest.fixture
def aws(moto_endpoint: str) -> Aws:
    aws = Aws(moto_endpoint)
    aws.reset()
    aws.setup_cluster()
    return aws
