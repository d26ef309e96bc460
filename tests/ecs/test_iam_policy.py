"""The Orchestrator's IAM policy (deploy/ecs/) allows exactly the AWS calls the
ECS backend makes: every ``<client>.ecs.<operation>`` in its source, found by
AST, is an action of the policy, and the policy has no other action (but the
few a call implies, listed with why)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src/orchestrator_service/backends/ecs"
POLICY = ROOT / "deploy/ecs/orchestrator-policy.json"
CLIENTS = {"ecs": "ecs", "ec2": "ec2", "iam": "iam"}
"""Names the backend gives its boto3 clients -> their IAM service prefix."""
IMPLIED = {"iam:PassRole": "RegisterTaskDefinition/RunTask with the task execution role"}


def _action(service: str, operation: str) -> str:
    return f"{service}:" + "".join(part.capitalize() for part in operation.split("_"))


def calls_in_code() -> set[str]:
    found = set()
    for path in SOURCE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else owner.id if isinstance(owner, ast.Name) else ""
            if name in CLIENTS and not node.attr.startswith("_"):
                found.add(_action(CLIENTS[name], node.attr))
    return found


def clients_made() -> set[str]:
    """Services of every boto3 client the backend makes (``.client("ecs", ...)``)."""
    made = set()
    for path in SOURCE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "client"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                made.add(str(node.args[0].value))
    return made


def policy_actions() -> set[str]:
    statements = json.loads(POLICY.read_text())["Statement"]
    return {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}


def test_the_policy_allows_what_the_code_calls_and_nothing_more() -> None:
    code = calls_in_code()
    assert "ecs:RunTask" in code and "ecs:DescribeTasks" in code, "the AST walk found the calls"
    assert clients_made() <= set(CLIENTS), "a client the policy test does not know"
    policy = policy_actions()
    assert code - policy == set(), "calls the policy does not allow"
    assert policy - code - set(IMPLIED) == set(), "actions the code never uses"


def test_no_wildcard_actions_and_only_allows() -> None:
    statements = json.loads(POLICY.read_text())["Statement"]
    assert all(s["Effect"] == "Allow" for s in statements)
    assert not any("*" in a for a in policy_actions())
    # What can be scoped is: only wildcard resources for calls that take none.
    unscoped = {a for s in statements if s["Resource"] == "*" for a in s["Action"]}
    assert unscoped == {"ecs:DescribeTaskDefinition", "ecs:RegisterTaskDefinition", "ecs:ListTasks"}
