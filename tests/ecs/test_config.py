"""SANDHUB_ECS_* configuration and choosing the backend by name."""

from __future__ import annotations

import pytest

from orchestrator_service.backends import load_backend
from sandhub.config import ConfigError, EcsPlacement, load_orchestrator


def test_ecs_configuration_from_the_environment() -> None:
    config = load_orchestrator({
        "SANDHUB_BACKEND": "ecs", "SANDHUB_ECS_CLUSTER": "classes", "SANDHUB_ECS_SUBNETS": "subnet-a, subnet-b",
        "SANDHUB_ECS_SECURITY_GROUPS": "sg-1", "SANDHUB_ECS_STARTED_BY": "sandhub-prod",
        "SANDHUB_ECS_PLACEMENTS": '{"spot": {"capacityProvider": "FARGATE_SPOT"}, '
                                  '"ec2": {"capacityProvider": "sandbox-asg", "subnets": ["subnet-c"]}}',
    })
    ecs = config.ecs
    assert (ecs.cluster, ecs.subnets, ecs.security_groups, ecs.started_by, ecs.assign_public_ip) == (
        "classes", ("subnet-a", "subnet-b"), ("sg-1",), "sandhub-prod", False)
    assert dict(ecs.placements) == {"spot": EcsPlacement("FARGATE_SPOT"),
                                    "ec2": EcsPlacement("sandbox-asg", subnets=("subnet-c",))}
    assert config.placements == ("spot", "ec2"), "the ECS placement profiles are the placements"
    assert load_backend(config, lambda e: None).name == "ecs"


@pytest.mark.parametrize("env", [
    {"SANDHUB_ECS_PLACEMENTS": '{"x": {"nodeSelector": {}}}'},
    {"SANDHUB_ECS_PLACEMENTS": "[]"},
    {"SANDHUB_ECS_STARTED_BY": "has spaces"},
    {"SANDHUB_ECS_AGENT_PORT": "70000"},
])
def test_bad_ecs_configuration_names_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_orchestrator(env)
    assert next(iter(env)) in str(e.value)
