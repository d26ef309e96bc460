"""A local AWS endpoint for the ECS backend: moto's server on loopback, with
a VPC, a subnet, a security group and a cluster with FARGATE, FARGATE_SPOT
and an EC2 capacity provider. Used by `sandhub bench ecs-burst` and the ECS
tests (moto is a dev dependency: `pip install -e '.[dev]'`).

moto runs no containers: a task "runs" at once (RUNNING, with an ENI address
nothing answers on) and, unless told otherwise, each DescribeTasks moves it
one step toward STOPPED; ``manual_tasks`` pins tasks where they are (the
state manager's manual transition), so they change only when stopped. What
only a real AWS account shows: PROVISIONING/PENDING before RUNNING, real
stop codes (moto sets none), real throttling, Fargate's launch rate, image
pulls.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

REGION = "us-east-1"
CLUSTER = "sandhub-test"
EC2_PROVIDER = "sandhub-ec2"
FAKE_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
                    "aws_session_token": "testing"}
"""moto takes any credentials; these keep real ones from ever being sent."""


@dataclass
class LocalAws:
    endpoint: str
    subnet: str = ""
    security_group: str = ""
    clients: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        import boto3

        if service not in self.clients:
            self.clients[service] = boto3.session.Session(**FAKE_CREDENTIALS).client(
                service, region_name=REGION, endpoint_url=self.endpoint)
        return self.clients[service]

    def _post(self, path: str, body: dict[str, Any] | None = None) -> None:
        request = urllib.request.Request(self.endpoint + path, data=json.dumps(body or {}).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def reset(self) -> None:
        self._post("/moto-api/reset")

    def manual_tasks(self) -> None:
        """Tasks stay as they are until stopped (no DescribeTasks advances them)."""
        self._post("/moto-api/state-manager/set-transition",
                   {"model_name": "ecs::task", "transition": {"progression": "manual", "times": 10**9}})

    def setup_cluster(self) -> None:
        ec2 = self.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
        # moto gives a task's ENI a DNS name only in a VPC with DNS hostnames
        # (and fails RunTask without one); Fargate VPCs usually have them too.
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        self.subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.20.0.0/17")["Subnet"]["SubnetId"]
        self.security_group = ec2.create_security_group(
            GroupName="sandhub-tasks", Description="sandhub tasks", VpcId=vpc)["GroupId"]
        ecs = self.client("ecs")
        ecs.create_capacity_provider(name=EC2_PROVIDER, autoScalingGroupProvider={
            "autoScalingGroupArn": f"arn:aws:autoscaling:{REGION}:123456789012:autoScalingGroup:x:"
                                   "autoScalingGroupName/sandhub"})
        ecs.create_cluster(clusterName=CLUSTER, capacityProviders=["FARGATE", "FARGATE_SPOT", EC2_PROVIDER])
        # The EC2 provider's Auto Scaling group, as one instance that joined the cluster.
        instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="m5.xlarge",
                                     SubnetId=self.subnet)["Instances"][0]
        ecs.register_container_instance(cluster=CLUSTER, instanceIdentityDocument=json.dumps({
            "instanceId": instance["InstanceId"], "region": REGION}))
        self.manual_tasks()

    def tasks(self, started_by: str = "") -> list[dict[str, Any]]:
        """Every task of the cluster (of ``started_by``), described with tags."""
        ecs = self.client("ecs")
        arns: list[str] = []
        for desired in ("RUNNING", "STOPPED"):
            arns += ecs.list_tasks(cluster=CLUSTER, desiredStatus=desired,
                                   **({"startedBy": started_by} if started_by else {}))["taskArns"]
        found: list[dict[str, Any]] = []
        for i in range(0, len(arns), 100):
            found += ecs.describe_tasks(cluster=CLUSTER, tasks=arns[i:i + 100], include=["TAGS"])["tasks"]
        return found


@contextmanager
def moto_server() -> Iterator[LocalAws]:
    """moto's server on 127.0.0.1 and a port of its own, stopped on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield LocalAws(f"http://{host}:{port}")
    finally:
        server.stop()
