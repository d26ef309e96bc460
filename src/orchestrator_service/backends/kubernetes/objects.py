"""Pure builders of the Kubernetes objects of one container, no I/O.

Everything the orchestrator must know again after a restart is written here
into labels (what must be selectable: id, tenant, placement, expiry) and
annotations (exact values labels can't hold: the tenant's real name, the
caller's labels, resources Kubernetes has no field for, times with
sub-second precision), so the cluster is the only source of truth.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from datetime import datetime

from kubernetes import client

from orchestrator_service.backends import cluster_agent as agent
from orchestrator_service.backends.kubernetes.slug import slug
from orchestrator_service.model import Container, ContainerSpec
from sandhub.config import KubernetesBackendConfig, KubernetesPlacement
from sandhub.errors import InvalidField

PREFIX = "sandhub.dev/"
LABEL_CONTAINER_ID = PREFIX + "container-id"
LABEL_TENANT = PREFIX + "tenant"
LABEL_PLACEMENT = PREFIX + "placement"
LABEL_EXPIRES = PREFIX + "expires"
"""Expiry as unix seconds: selectable (`sandhub.dev/expires<...` by clients that sort)."""
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "sandhub"

ANN_TENANT = PREFIX + "tenant"
ANN_LABELS = PREFIX + "labels"
ANN_RESOURCES = PREFIX + "resources"
ANN_PLACEMENT = PREFIX + "placement"
ANN_CREATE_TIME = PREFIX + "create-time"
ANN_EXPIRE_TIME = PREFIX + "expire-time"
ANN_READY_TIME = PREFIX + "ready-time"
"""When the orchestrator saw the pod turn Running (sub-second; the pod's own
Ready stamp is whole seconds, coarser than a creation time)."""
ANN_REQUEST_ID = PREFIX + "request-id"
ANN_DEFAULTED_ENV = PREFIX + "defaulted-env"
ANN_DELETE_REASON = PREFIX + "delete-reason"
ANN_DELETE_TIME = PREFIX + "delete-time"

CONTAINER_NAME = "main"
WORK_DIR = "/work"
ENV_CONTAINER_ID = agent.CONTAINER_ID_ENV
BASELINE_POLICY = "sandhub-default-deny"

AGENT_INIT = "sandhub-agent-install"
"""The init container that copies the agent into the pod (the agent image's only job)."""
AGENT_VOLUME = "sandhub-agent"
AGENT_STATE_VOLUME = "sandhub-agent-state"
AGENT_VOLUME_LIMIT = "32Mi"
"""The agent binary (~11 MB, static) in a memory-backed emptyDir: it must not
count against the container's disk, and a copy too big fails loudly."""
AGENT_PROBE_PERIOD_S = 1
"""How often the kubelet checks that the agent listens. The pod is Ready (the
container RUNNING) only once it does; a second, so a create doesn't wait a
default 10 s probe period for its first success."""


def container_selector() -> str:
    """Every pod this backend manages, in its namespace."""
    return f"{LABEL_CONTAINER_ID},{LABEL_MANAGED_BY}={MANAGED_BY}"


def iso(t: datetime) -> str:
    return t.isoformat()


def pod_labels(spec: ContainerSpec, *, container_id: str, placement: KubernetesPlacement,
               expire_time: datetime) -> dict[str, str]:
    """The caller's labels (already valid label syntax, checked by validation),
    the placement's, and ours. A caller label that collides with a placement or
    system label is refused rather than silently overwritten: it would move the
    pod to another Fargate profile, or hide it from the orchestrator."""
    ours = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_CONTAINER_ID: container_id,
        LABEL_TENANT: slug(spec.tenant),
        LABEL_PLACEMENT: slug(spec.placement),
        LABEL_EXPIRES: str(int(expire_time.timestamp())),
    }
    for key in spec.labels:
        if key in ours or key in placement.labels:
            raise InvalidField(f"labels[{key}]", f"label key {key!r} is set by sandhub (or by placement "
                                         f"{spec.placement!r}) and can't be chosen")
    return {**spec.labels, **placement.labels, **ours}


def pod_annotations(spec: ContainerSpec, *, create_time: datetime, expire_time: datetime,
                    defaulted_env: list[str]) -> dict[str, str]:
    r = spec.resources
    annotations = {
        ANN_TENANT: spec.tenant,
        ANN_PLACEMENT: spec.placement,
        ANN_LABELS: json.dumps(spec.labels, sort_keys=True),
        ANN_RESOURCES: json.dumps({"cpu_millicores": r.cpu_millicores, "memory_mib": r.memory_mib, "pids": r.pids,
                                   "disk_mib": r.disk_mib, "open_files": r.open_files}, sort_keys=True),
        ANN_CREATE_TIME: iso(create_time),
        ANN_EXPIRE_TIME: iso(expire_time),
    }
    if spec.request_id:
        annotations[ANN_REQUEST_ID] = spec.request_id
    if defaulted_env:
        annotations[ANN_DEFAULTED_ENV] = ",".join(defaulted_env)
    return annotations


def container_env(spec: ContainerSpec, container_id: str) -> tuple[list[client.V1EnvVar], list[str]]:
    """HOME defaults to the writable work dir (the root is read-only); the id and
    the agent's credential are always ours (a caller's value for them is dropped).
    Returns the env and which keys were defaulted (not the caller's)."""
    defaults = {"HOME": WORK_DIR}
    defaulted = sorted(k for k in defaults if k not in spec.env)
    callers = {k: v for k, v in spec.env.items() if k not in agent.AGENT_ENV}
    env = {**{k: defaults[k] for k in defaulted}, **callers, ENV_CONTAINER_ID: container_id}
    return [client.V1EnvVar(name=k, value=v) for k, v in env.items()], defaulted


def agent_init_container(config: KubernetesBackendConfig, container_id: str, agent_key: bytes) -> client.V1Container:
    """Copies the agent into the pod's agent volume and leaves its credential
    in the state volume for it, then exits: the credential is in this
    container's environment only, never the main one's."""
    token = agent.init_environment(agent_key, container_id)
    return client.V1Container(
        name=AGENT_INIT,
        image=config.agent_image,
        image_pull_policy=config.image_pull_policy,
        command=agent.install_command(),
        env=[client.V1EnvVar(name=k, value=v) for k, v in token.items()],
        # Small and bounded; the pod's request is the larger of this and the main container's.
        resources=client.V1ResourceRequirements(requests={"cpu": "50m", "memory": "32Mi"},
                                                limits={"cpu": "500m", "memory": "64Mi"}),
        security_context=security_context(config),
        volume_mounts=[client.V1VolumeMount(name=AGENT_VOLUME, mount_path=agent.AGENT_DIR),
                       client.V1VolumeMount(name=AGENT_STATE_VOLUME, mount_path=agent.STATE_DIR)],
    )


def agent_probe(config: KubernetesBackendConfig) -> client.V1Probe:
    """Ready once the agent accepts connections (it listens only after it read
    its credential and made its state directory)."""
    return client.V1Probe(tcp_socket=client.V1TCPSocketAction(port=config.agent_port),
                          period_seconds=AGENT_PROBE_PERIOD_S, timeout_seconds=1, failure_threshold=3)


def security_context(config: KubernetesBackendConfig) -> client.V1SecurityContext:
    return client.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=config.run_as_user,
        run_as_group=config.run_as_user,
        allow_privilege_escalation=False,
        privileged=False,
        read_only_root_filesystem=True,
        capabilities=client.V1Capabilities(drop=["ALL"]),
        seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
    )


def make_pod(spec: ContainerSpec, *, container_id: str, config: KubernetesBackendConfig,
             create_time: datetime, expire_time: datetime, agent_key: bytes) -> client.V1Pod:
    """The pod of one container: hardened by default, placed by its profile;
    its command is the exec agent, copied in by an init container."""
    agent.check_ports(spec.ports, config.agent_port)
    placement = config.placements[spec.placement]
    image = spec.image or config.default_image
    r = spec.resources
    quantities = {"cpu": f"{r.cpu_millicores}m", "memory": f"{r.memory_mib}Mi"}
    env, defaulted = container_env(spec, container_id)
    container = client.V1Container(
        name=CONTAINER_NAME,
        image=image,
        image_pull_policy=config.image_pull_policy,
        # The agent is pid 1: it starts and reaps every command run in the container.
        command=agent.agent_command(config.agent_port, container_id),
        working_dir=WORK_DIR,
        env=env,
        ports=[client.V1ContainerPort(container_port=p.port, protocol=p.protocol, name=p.name or None)
               for p in spec.ports] or None,
        resources=client.V1ResourceRequirements(
            requests=dict(quantities),
            limits={**quantities, "ephemeral-storage": f"{r.disk_mib}Mi"},
        ),
        security_context=security_context(config),
        readiness_probe=agent_probe(config),
        volume_mounts=[client.V1VolumeMount(name="work", mount_path=WORK_DIR),
                       client.V1VolumeMount(name="tmp", mount_path="/tmp"),
                       client.V1VolumeMount(name=AGENT_VOLUME, mount_path=agent.AGENT_DIR, read_only=True),
                       client.V1VolumeMount(name=AGENT_STATE_VOLUME, mount_path=agent.STATE_DIR)],
    )
    return client.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=client.V1ObjectMeta(
            name=container_id,
            namespace=config.namespace,
            labels=pod_labels(spec, container_id=container_id, placement=placement, expire_time=expire_time),
            annotations=pod_annotations(spec, create_time=create_time, expire_time=expire_time,
                                        defaulted_env=defaulted),
        ),
        spec=client.V1PodSpec(
            init_containers=[agent_init_container(config, container_id, agent_key)],
            containers=[container],
            restart_policy="Never",
            automount_service_account_token=False,
            enable_service_links=False,
            hostname=container_id,
            security_context=client.V1PodSecurityContext(
                run_as_non_root=True,
                run_as_user=config.run_as_user,
                run_as_group=config.run_as_user,
                fs_group=config.run_as_user,
                seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
            ),
            volumes=[
                client.V1Volume(name="work", empty_dir=client.V1EmptyDirVolumeSource(size_limit=f"{r.disk_mib}Mi")),
                client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource(size_limit=f"{r.disk_mib}Mi")),
                client.V1Volume(name=AGENT_VOLUME, empty_dir=client.V1EmptyDirVolumeSource(
                    medium="Memory", size_limit=AGENT_VOLUME_LIMIT)),
                client.V1Volume(name=AGENT_STATE_VOLUME,
                                empty_dir=client.V1EmptyDirVolumeSource(size_limit=f"{r.disk_mib}Mi")),
            ],
            node_selector=dict(placement.node_selector) or None,
            tolerations=[client.V1Toleration(key=t.key, operator=t.operator, value=t.value or None,
                                             effect=t.effect or None) for t in placement.tolerations] or None,
            runtime_class_name=placement.runtime_class or None,
        ),
    )


def _hub_peer(config: KubernetesBackendConfig) -> client.V1NetworkPolicyPeer:
    return client.V1NetworkPolicyPeer(
        pod_selector=client.V1LabelSelector(match_labels=dict(config.hub_labels)),
        namespace_selector=client.V1LabelSelector(
            match_labels={"kubernetes.io/metadata.name": config.hub_namespace}) if config.hub_namespace else None,
    )


def make_baseline_policy(config: KubernetesBackendConfig) -> client.V1NetworkPolicy:
    """Denies all ingress and egress of every container pod but the Hub's
    calls to its exec agent. Policies add up, so a container's own policy
    (made after its pod) can only open what it names, and a pod is never open
    in between: its agent is reachable by the Hub from the start, by nobody else."""
    return client.V1NetworkPolicy(
        api_version="networking.k8s.io/v1",
        kind="NetworkPolicy",
        metadata=client.V1ObjectMeta(name=BASELINE_POLICY, namespace=config.namespace,
                                     labels={LABEL_MANAGED_BY: MANAGED_BY}),
        spec=client.V1NetworkPolicySpec(
            pod_selector=client.V1LabelSelector(match_expressions=[
                client.V1LabelSelectorRequirement(key=LABEL_CONTAINER_ID, operator="Exists")]),
            policy_types=["Ingress", "Egress"],
            ingress=[client.V1NetworkPolicyIngressRule(
                _from=[_hub_peer(config)],
                ports=[client.V1NetworkPolicyPort(port=config.agent_port, protocol="TCP")])],
        ),
    )


def needs_policy(spec: ContainerSpec, config: KubernetesBackendConfig) -> bool:
    """A container with no ports and no egress is fully covered by the baseline."""
    return config.network_policies and bool(spec.ports or config.placements[spec.placement].egress_cidrs)


def needs_policy_for(container: Container, config: KubernetesBackendConfig) -> bool:
    """needs_policy() of an existing container (to know whether to delete one)."""
    placement = config.placements.get(container.placement)
    return config.network_policies and bool(container.ports or (placement and placement.egress_cidrs))


def make_network_policy(spec: ContainerSpec, *, container_id: str, config: KubernetesBackendConfig,
                        owner_uid: str) -> client.V1NetworkPolicy:
    """Admits only the container's own ports, only from the Hub; egress only to
    the placement's CIDRs (minus private and metadata ranges). Owned by the pod,
    so the garbage collector removes it with the pod even if we don't."""
    placement = config.placements[spec.placement]
    ingress = [client.V1NetworkPolicyIngressRule(
        _from=[_hub_peer(config)],
        ports=[client.V1NetworkPolicyPort(port=p.port, protocol=p.protocol) for p in spec.ports],
    )] if spec.ports else []
    egress = [client.V1NetworkPolicyEgressRule(to=[
        client.V1NetworkPolicyPeer(ip_block=client.V1IPBlock(cidr=cidr, _except=_excepts(cidr, config) or None))
        for cidr in placement.egress_cidrs
    ]), _dns_rule()] if placement.egress_cidrs else []
    return client.V1NetworkPolicy(
        api_version="networking.k8s.io/v1",
        kind="NetworkPolicy",
        metadata=client.V1ObjectMeta(
            name=container_id, namespace=config.namespace,
            labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_CONTAINER_ID: container_id},
            owner_references=[client.V1OwnerReference(api_version="v1", kind="Pod", name=container_id,
                                                      uid=owner_uid, block_owner_deletion=False)],
        ),
        spec=client.V1NetworkPolicySpec(
            pod_selector=client.V1LabelSelector(match_labels={LABEL_CONTAINER_ID: container_id}),
            policy_types=["Ingress", "Egress"],
            ingress=ingress or None,
            egress=egress or None,
        ),
    )


def _dns_rule() -> client.V1NetworkPolicyEgressRule:
    """Names must resolve where egress is allowed; the cluster DNS sits in a
    private range the CIDR rule excludes."""
    return client.V1NetworkPolicyEgressRule(
        to=[client.V1NetworkPolicyPeer(
            namespace_selector=client.V1LabelSelector(match_labels={"kubernetes.io/metadata.name": "kube-system"}),
            pod_selector=client.V1LabelSelector(match_labels={"k8s-app": "kube-dns"}),
        )],
        ports=[client.V1NetworkPolicyPort(port=53, protocol="UDP"), client.V1NetworkPolicyPort(port=53, protocol="TCP")],
    )


def _excepts(cidr: str, config: KubernetesBackendConfig) -> list[str]:
    """The configured exceptions that lie inside ``cidr`` (the API refuses others)."""
    outer = ipaddress.ip_network(cidr, strict=False)
    out: list[str] = []
    for e in config.egress_except:
        inner = ipaddress.ip_network(e, strict=False)
        if inner.version == outer.version and inner != outer and inner.subnet_of(outer):  # type: ignore[arg-type]
            out.append(e)
    return out


def expiry_patch(expire_time: datetime) -> dict[str, object]:
    """A merge patch moving the expiry (label and annotation together)."""
    return {"metadata": {"labels": {LABEL_EXPIRES: str(int(expire_time.timestamp()))},
                         "annotations": {ANN_EXPIRE_TIME: iso(expire_time)}}}


def ready_patch(ready_time: datetime) -> dict[str, object]:
    """A merge patch recording when the pod was seen Running."""
    return {"metadata": {"annotations": {ANN_READY_TIME: iso(ready_time)}}}


def delete_mark_patch(reason: str, resource_version: str, now: datetime) -> dict[str, object]:
    """Marks a pod as being deleted, guarded by its resourceVersion: of two
    orchestrators deleting or reaping it at once, exactly one wins (the other
    gets 409), so one deletes and logs it and the reason is stored once. The
    time lets anyone finish a delete whose winner died before sending it."""
    return {"metadata": {"resourceVersion": resource_version,
                         "annotations": {ANN_DELETE_REASON: reason, ANN_DELETE_TIME: iso(now)}}}


def labels_from_annotation(annotations: Mapping[str, str]) -> dict[str, str]:
    raw = annotations.get(ANN_LABELS) or "{}"
    loaded = json.loads(raw)
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
