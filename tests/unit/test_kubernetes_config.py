"""The Kubernetes backend's configuration from the environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandhub.config import (
    ConfigError, KubernetesPlacement, KubernetesToleration, load_kubernetes, load_orchestrator,
)

PLACEMENTS = {
    "fargate": {"labels": {"compute": "fargate"}},
    "ec2": {"nodeSelector": {"eks.amazonaws.com/nodegroup": "sandbox"},
            "tolerations": [{"key": "dedicated", "value": "sandbox", "effect": "NoSchedule"}],
            "runtimeClassName": "gvisor", "egressCidrs": ["0.0.0.0/0"]},
}


def test_defaults() -> None:
    c = load_kubernetes({})
    assert c.namespace == "sandhub" and c.kubeconfig == "" and c.network_policies
    assert dict(c.placements) == {"default": KubernetesPlacement()}
    assert load_orchestrator({}).placements == ("default",)


def test_placements_from_json_become_the_orchestrators_placements(tmp_path: Path) -> None:
    env = {"SANDHUB_BACKEND": "kubernetes", "SANDHUB_K8S_PLACEMENTS": json.dumps(PLACEMENTS),
           "SANDHUB_K8S_NAMESPACE": "sbx", "SANDHUB_K8S_HUB_LABELS": "app=hub,tier=front",
           "SANDHUB_K8S_UNSCHEDULABLE_TIMEOUT": "90"}
    config = load_orchestrator(env)
    assert config.placements == ("fargate", "ec2")  # the first is the default
    k = config.kubernetes
    assert k.namespace == "sbx" and dict(k.hub_labels) == {"app": "hub", "tier": "front"}
    assert k.unschedulable_timeout_s == 90
    assert k.placements["ec2"] == KubernetesPlacement(
        node_selector={"eks.amazonaws.com/nodegroup": "sandbox"},
        tolerations=(KubernetesToleration(key="dedicated", value="sandbox", effect="NoSchedule"),),
        runtime_class="gvisor", egress_cidrs=("0.0.0.0/0",))
    path = tmp_path / "placements.json"
    path.write_text(json.dumps(PLACEMENTS))
    assert load_kubernetes({"SANDHUB_K8S_PLACEMENTS_FILE": str(path)}).placements == k.placements


@pytest.mark.parametrize("raw, words", [
    ("not json", "not JSON"),
    ("[]", "non-empty object"),
    ('{"x": {"nodeselector": {}}}', "unknown keys"),
    ('{"x": {"tolerations": [{"value": "v"}]}}', "'key'"),
])
def test_bad_placements_name_the_variable(raw: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_kubernetes({"SANDHUB_K8S_PLACEMENTS": raw})
    assert "SANDHUB_K8S_PLACEMENTS" in str(e.value) and words in str(e.value)


def test_the_agent_image_and_port() -> None:
    assert (load_kubernetes({}).agent_image, load_kubernetes({}).agent_port) == ("sandhub/sandhub-agent:latest", 49983)
    c = load_kubernetes({"SANDHUB_K8S_AGENT_IMAGE": "registry/agent:1", "SANDHUB_K8S_AGENT_PORT": "7000"})
    assert (c.agent_image, c.agent_port) == ("registry/agent:1", 7000)
    for bad in ("0", "65536", "x"):
        with pytest.raises(ConfigError) as e:
            load_kubernetes({"SANDHUB_K8S_AGENT_PORT": bad})
        assert "SANDHUB_K8S_AGENT_PORT" in str(e.value)
