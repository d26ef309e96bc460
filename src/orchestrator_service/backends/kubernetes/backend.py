"""KubernetesBackend: a container is a Pod; the cluster holds all its state.

Pods carry everything in labels and annotations (objects.py), so a restarted
orchestrator lists them and knows every container again; one shared watch
(watcher.py) keeps an in-memory view current and reports readiness and
failures at once. Reads are served from that view; writes go to the API
server through bounded, retried calls (api.py). Only the TERMINATED
tombstones of deleted pods live in memory: the pod is gone, and a restart
forgets them (Get then says NOT_FOUND instead of TERMINATED).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from dataclasses import replace
from datetime import datetime, timedelta

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from orchestrator_service.backends.base import Notify
from orchestrator_service.backends.cluster_agent import tcp_target
from orchestrator_service.backends.kubernetes import objects as o
from orchestrator_service.backends.kubernetes.api import Api, new_api_client
from orchestrator_service.backends.kubernetes.status import read_container
from orchestrator_service.backends.kubernetes.watcher import PodWatcher
from orchestrator_service.model import Container, ContainerSpec, Event, EventType, State, utcnow
from sandhub.config import KubernetesBackendConfig
from sandhub.errors import BackendError, BackendUnavailable, ContainerNotFound, InvalidField, QuotaExceeded, UnknownImage

log = structlog.get_logger("sandhub.kubernetes")
NAME = "kubernetes"
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
RECHECK_S = 1.0
STUCK_MARK_S = 30.0
"""A pod marked for deletion this long without being deleted lost its deleter."""
"""How often pods waiting on a timer (Unschedulable with a timeout) are looked at again."""


def _rv(pod: client.V1Pod) -> int:
    try:
        return int(pod.metadata.resource_version or 0)
    except ValueError:
        return 0


class KubernetesBackend:
    name = NAME

    def __init__(self, config: KubernetesBackendConfig, *, notify: Notify, agent_key: bytes,
                 placements: tuple[str, ...] = ()) -> None:
        """``agent_key``: internal_auth.agent_key(the Orchestrator token); each
        pod's agent gets its own credential derived from it."""
        self._config = config
        self._agent_key = agent_key
        self._notify = notify
        self._placements = placements or tuple(config.placements)
        self._ns = config.namespace
        self._pods: dict[str, client.V1Pod] = {}
        self._containers: dict[str, Container] = {}
        self._tombstones: dict[str, Container] = {}
        self._ready_seen: dict[str, datetime] = {}
        """When this orchestrator saw each pod turn RUNNING (sub-second, unlike the pod's own stamp)."""
        self._ready_patching: set[str] = set()
        self._created_here: set[str] = set()
        """Pods this process created: it alone records their ready time (another
        orchestrator watching the same pods would see them turn Running later)."""
        self._background: set[asyncio.Task[None]] = set()
        self._deleting: set[str] = set()
        self._forgetting: set[str] = set()
        self._api: Api | None = None
        self._watcher: PodWatcher | None = None
        self._ticker: asyncio.Task[None] | None = None

    @property
    def api(self) -> Api:
        assert self._api is not None, "KubernetesBackend.start() was not called"
        return self._api

    # -- start and stop -------------------------------------------------------------

    async def start(self) -> None:
        missing = [p for p in self._placements if p not in self._config.placements]
        if missing:
            raise ValueError(f"placements {', '.join(missing)} have no Kubernetes placement profile "
                             "(SANDHUB_K8S_PLACEMENTS)")
        api_client = await asyncio.to_thread(new_api_client, self._config)
        self._api = Api(self._config, api_client)
        if self._config.network_policies:
            await self._ensure_baseline_policy()
        self._watcher = PodWatcher(api_client=api_client, namespace=self._ns, selector=o.container_selector(),
                                   on_event=self._on_event, on_list=self._on_list,
                                   request_timeout_s=self._config.request_timeout_s)
        pods, rv = await self.api.call("list pods", self._watcher.list_pods)
        self._on_list(pods)
        self._watcher.start(pods, rv)
        self._ticker = asyncio.create_task(self._recheck_forever(), name="k8s-recheck")
        log.info("kubernetes.started", **self.status(), containers=len(self._containers))

    async def _ensure_baseline_policy(self) -> None:
        """Creates the baseline, or brings one an older version (or another
        agent port) left up to date: it is what admits the Hub to the agents."""
        wanted = o.make_baseline_policy(self._config)
        net = self.api.networking
        try:
            await self.api.call("create baseline policy", net.create_namespaced_network_policy, self._ns, wanted)
            return
        except ApiException as e:
            if e.status != 409:
                raise BackendError(f"cannot create the baseline NetworkPolicy: {e.status} {e.reason}") from e
        try:
            stored = await self.api.call("read baseline policy", net.read_namespaced_network_policy,
                                         o.BASELINE_POLICY, self._ns)
            serialize = self.api.client.sanitize_for_serialization
            if serialize(stored.spec) == serialize(wanted.spec):
                return
            wanted.metadata.resource_version = stored.metadata.resource_version
            await self.api.call("replace baseline policy", net.replace_namespaced_network_policy,
                                o.BASELINE_POLICY, self._ns, wanted)
            log.info("kubernetes.baseline_policy_updated", namespace=self._ns)
        except ApiException as e:
            raise BackendError(f"cannot update the baseline NetworkPolicy: {e.status} {e.reason}") from e

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._watcher is not None:
            self._watcher.stop()
            await self._watcher.join()
        if self._api is not None:
            self._api.client.close()

    def status(self) -> dict[str, str]:
        return {
            "backend": NAME,
            "namespace": self._ns,
            "placements": ", ".join(self._placements),
            "hardening": "runAsNonRoot, no privilege escalation, all capabilities dropped, seccomp RuntimeDefault, "
                         "read-only root, no service-account token",
            "network": "default-deny NetworkPolicies, the agent and ports open to the Hub only"
                       if self._config.network_policies
                       else "off (configured): pods reach each other",
            "limits": "cpu, memory, disk (ephemeral storage); pids and open files are the nodes' settings",
            "exec": f"sandhub-agent in every pod (init container {self._config.agent_image}, "
                    f"port {self._config.agent_port})",
        }

    def validate_image(self, image: str) -> None:
        if image and (len(image) > 512 or not _IMAGE.match(image) or "//" in image):
            raise UnknownImage(image, ": not an image reference like registry/name:tag")

    def agent_target(self, container: Container) -> str:
        """The pod's IP and the agent port (the pod is Ready only once the agent listens)."""
        return tcp_target(container.ip_address, self._config.agent_port, container.id)

    # -- the view ------------------------------------------------------------------

    def _read(self, pod: client.V1Pod) -> Container:
        return read_container(pod, backend=NAME, now=utcnow(),
                              unschedulable_timeout_s=self._config.unschedulable_timeout_s)

    def _store(self, pod: client.V1Pod) -> Container:
        """Takes a pod version into the view unless a newer one is there
        (a create or patch answer can arrive after the watch event)."""
        cid = pod.metadata.name
        if cid in self._tombstones:
            # The watch already saw it deleted; this answer is older news.
            return self._tombstones[cid]
        old = self._pods.get(cid)
        if old is not None and _rv(old) > _rv(pod):
            return self._containers[cid]
        self._pods[cid] = pod
        return self._refresh(cid)

    def _refresh(self, cid: str) -> Container:
        container = self._read(self._pods[cid])
        previous = self._containers.get(cid)
        container = self._with_ready_time(cid, container, previous)
        self._containers[cid] = container
        if previous != container:
            self._notify(Event(EventType.ADDED if previous is None else EventType.MODIFIED, container))
            if container.state is State.FAILED and (previous is None or previous.state is not State.FAILED):
                log.warning("kubernetes.container_failed", container_id=cid, reason=container.state_reason,
                            message=container.state_message)
        return container

    def _with_ready_time(self, cid: str, container: Container, previous: Container | None) -> Container:
        """The pod's Ready condition is stamped to the whole second, coarser
        than the create time: when this orchestrator sees a pod turn RUNNING
        itself, that moment is its ready time, recorded on the pod (one patch)
        so a restart reads the same. Adopted pods keep what is recorded."""
        if (container.state is not State.RUNNING or previous is None or previous.state is not State.PENDING
                or cid not in self._created_here):
            return container
        if o.ANN_READY_TIME in (self._pods[cid].metadata.annotations or {}):
            return container
        seen = self._ready_seen.setdefault(cid, utcnow())
        if cid not in self._ready_patching:
            self._ready_patching.add(cid)
            task = asyncio.ensure_future(self._record_ready(cid, seen))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return replace(container, ready_time=seen)

    async def _record_ready(self, cid: str, seen: datetime) -> None:
        try:
            pod = await self.api.call("record ready time", self.api.core.patch_namespaced_pod, cid, self._ns,
                                      o.ready_patch(seen))
            self._store(pod)
        except (ApiException, BackendError, BackendUnavailable) as e:
            log.warning("kubernetes.ready_time_not_recorded", container_id=cid, error=str(e))
        finally:
            self._ready_patching.discard(cid)

    def _gone(self, cid: str) -> None:
        self._ready_seen.pop(cid, None)
        self._created_here.discard(cid)
        self._pods.pop(cid, None)
        last = self._containers.pop(cid, None)
        if cid in self._forgetting:
            self._forgetting.discard(cid)
            return
        if last is None:
            return
        reason = last.state_reason if last.state is State.TERMINATING else "Deleted"
        tomb = last.with_state(State.TERMINATED, reason=reason or "Deleted", message=last.state_message)
        self._tombstones[cid] = replace(tomb, ip_address="", endpoints=())
        self._notify(Event(EventType.DELETED, self._tombstones[cid]))

    def _on_event(self, kind: str, pod: client.V1Pod) -> None:
        if kind == "DELETED":
            self._gone(pod.metadata.name)
        else:
            self._store(pod)

    def _on_list(self, pods: list[client.V1Pod]) -> None:
        """A full list replaces the view: pods missing from it are gone."""
        seen = {p.metadata.name for p in pods}
        for cid in [c for c in self._pods if c not in seen]:
            self._gone(cid)
        for pod in pods:
            self._store(pod)

    async def _recheck_forever(self) -> None:
        """Re-reads pods whose state depends on time passing: an Unschedulable
        pod becomes FAILED when its timeout runs out; a pod marked for deletion
        long ago but never deleted (its orchestrator died in between) is deleted."""
        while True:
            await asyncio.sleep(RECHECK_S)
            for cid, c in list(self._containers.items()):
                pod = self._pods.get(cid)
                if pod is None:
                    continue
                if c.state is State.PENDING and c.state_reason == "Unschedulable":
                    self._refresh(cid)
                elif c.state is State.TERMINATING and self._stuck_mark(pod) and cid not in self._deleting:
                    log.warning("kubernetes.finishing_delete", container_id=cid)
                    try:
                        await self._delete_pod(cid, uid=pod.metadata.uid, grace_s=1)
                    except Exception as e:
                        log.warning("kubernetes.finish_delete_failed", container_id=cid, error=str(e))

    @staticmethod
    def _stuck_mark(pod: client.V1Pod) -> bool:
        if pod.metadata.deletion_timestamp is not None:
            return False
        marked = (pod.metadata.annotations or {}).get(o.ANN_DELETE_TIME, "")
        try:
            at = datetime.fromisoformat(marked)
        except ValueError:
            return True
        return (utcnow() - at).total_seconds() > STUCK_MARK_S

    # -- lifecycle -------------------------------------------------------------------

    async def create(self, *, spec: ContainerSpec, container_id: str) -> Container:
        now = utcnow()
        pod = o.make_pod(spec, container_id=container_id, config=self._config, create_time=now,
                         expire_time=now + timedelta(seconds=spec.ttl_s), agent_key=self._agent_key)
        try:
            self._created_here.add(container_id)
            created = await self.api.call("create pod", self.api.core.create_namespaced_pod, self._ns, pod)
        except ApiException as e:
            if e.status != 409:
                raise _refused(e, "pod") from e
            # An earlier attempt went through after all (the answer was lost).
            created = await self.api.call("read pod", self.api.core.read_namespaced_pod, container_id, self._ns)
            if (created.metadata.annotations or {}).get(o.ANN_TENANT) != spec.tenant:
                raise BackendError(f"pod {container_id} exists and is not this container") from e
        container = self._store(created)
        if o.needs_policy(spec, self._config):
            await self._create_policy(spec, container_id, created.metadata.uid)
        return container

    async def _create_policy(self, spec: ContainerSpec, container_id: str, uid: str) -> None:
        policy = o.make_network_policy(spec, container_id=container_id, config=self._config, owner_uid=uid)
        try:
            await self.api.call("create policy", self.api.networking.create_namespaced_network_policy,
                                self._ns, policy)
        except ApiException as e:
            if e.status == 409:
                return
            # The baseline keeps the pod closed, but its ports would never open: undo.
            await self._delete_pod(container_id, uid=uid, grace_s=0)
            raise _refused(e, "network policy") from e

    async def get(self, *, container_id: str) -> Container:
        known = self._containers.get(container_id) or self._tombstones.get(container_id)
        if known is not None:
            return known
        # Not seen yet (made by another orchestrator a moment ago?): ask the server.
        pod = await self.api.read_container_pod(self._ns, container_id, id_label=o.LABEL_CONTAINER_ID)
        return self._store(pod)

    async def list(self) -> list[Container]:
        return [*self._containers.values(), *self._tombstones.values()]

    async def delete(self, *, container_id: str, grace_period_s: float, reason: str) -> Container:
        c = await self.get(container_id=container_id)
        if c.state in (State.TERMINATING, State.TERMINATED) or container_id in self._deleting:
            return c
        self._deleting.add(container_id)
        try:
            pod = await self._mark_deleting(container_id, reason)
            if pod is None:  # someone else is deleting it, or it is gone
                return await self._current(container_id)
            await self._delete_pod(container_id, uid=pod.metadata.uid, grace_s=grace_period_s)
            if o.needs_policy_for(c, self._config):
                await self._delete_policy(container_id)
            log.info("kubernetes.deleting", container_id=container_id, reason=reason)
            return await self._current(container_id)
        finally:
            self._deleting.discard(container_id)

    async def _current(self, container_id: str) -> Container:
        known = self._containers.get(container_id) or self._tombstones.get(container_id)
        if known is None:
            raise ContainerNotFound(container_id)
        return known

    async def _mark_deleting(self, container_id: str, reason: str) -> client.V1Pod | None:
        """Stores the reason, guarded by resourceVersion; None when another
        orchestrator got there first (or the pod is gone)."""
        for _ in range(3):
            pod = self._pods.get(container_id)
            if pod is None:
                return None
            if pod.metadata.deletion_timestamp is not None or o.ANN_DELETE_REASON in (pod.metadata.annotations or {}):
                return None
            try:
                marked = await self.api.call(
                    "mark pod", self.api.core.patch_namespaced_pod, container_id, self._ns,
                    o.delete_mark_patch(reason, pod.metadata.resource_version, utcnow()))
            except ApiException as e:
                if e.status == 404:
                    self._gone(container_id)
                    return None
                if e.status != 409:
                    raise BackendError(f"mark pod: {e.status} {e.reason}") from e
                try:
                    fresh = await self.api.call("read pod", self.api.core.read_namespaced_pod, container_id, self._ns)
                except ApiException as e2:
                    if e2.status != 404:
                        raise BackendError(f"read pod: {e2.status} {e2.reason}") from e2
                    self._gone(container_id)  # the winner was quick
                    return None
                self._store(fresh)
                continue
            self._store(marked)
            return marked
        return None

    async def _delete_pod(self, container_id: str, *, uid: str, grace_s: float, store: bool = True) -> None:
        # Grace 0 would be a force delete: the API forgets the pod while its
        # containers may still run on the node. One second is the least.
        body = client.V1DeleteOptions(grace_period_seconds=max(1, math.ceil(grace_s)),
                                      preconditions=client.V1Preconditions(uid=uid))
        try:
            pod = await self.api.call("delete pod", self.api.core.delete_namespaced_pod, container_id, self._ns,
                                      body=body)
        except ApiException as e:
            if e.status in (404, 409):  # gone, or a new pod of the same name
                return
            raise BackendError(f"delete pod: {e.status} {e.reason}") from e
        if store and isinstance(pod, client.V1Pod) and pod.metadata is not None and pod.metadata.deletion_timestamp:
            self._store(pod)

    async def _delete_policy(self, container_id: str) -> None:
        try:
            await self.api.call("delete policy", self.api.networking.delete_namespaced_network_policy,
                                container_id, self._ns)
        except ApiException as e:
            if e.status != 404:
                log.warning("kubernetes.policy_not_deleted", container_id=container_id, status=e.status)

    async def set_expiry(self, *, container_id: str, expire_time: datetime) -> Container:
        await self.get(container_id=container_id)
        try:
            pod = await self.api.call("patch expiry", self.api.core.patch_namespaced_pod, container_id, self._ns,
                                      o.expiry_patch(expire_time))
        except ApiException as e:
            if e.status == 404:
                raise ContainerNotFound(container_id) from None
            raise BackendError(f"patch expiry: {e.status} {e.reason}") from e
        return self._store(pod)

    async def forget(self, *, container_id: str) -> None:
        if self._tombstones.pop(container_id, None) is not None:
            return
        c = self._containers.get(container_id)
        if c is None or c.state is not State.FAILED or container_id in self._forgetting:
            return
        pod = self._pods[container_id]
        if pod.metadata.deletion_timestamp is not None:
            return
        self._forgetting.add(container_id)
        await self._delete_pod(container_id, uid=pod.metadata.uid, grace_s=0, store=False)
        if o.needs_policy_for(c, self._config):
            await self._delete_policy(container_id)


_POD_FIELDS = (("metadata.labels", "labels"), (".image", "image"), (".env", "env"), (".resources", "resources"),
               (".ports", "ports"))
"""Where in a pod the API server's message points -> the CreateContainerRequest field it came from."""


def _refused_field(message: str) -> str:
    """The request field a refused pod most likely owes its fault to; else
    "placement" (the rest of the pod is the placement profile's)."""
    return next((field for where, field in _POD_FIELDS if where in message), "placement")


def _refused(e: ApiException, what: str) -> Exception:
    """What the API server refused, as an error the caller can act on."""
    message = _message(e)
    if e.status == 403 and "exceeded quota" in message:
        return QuotaExceeded(f"the namespace's ResourceQuota is used up: {message}", limit="namespace ResourceQuota")
    if e.status in (400, 422):
        return InvalidField(_refused_field(message), f"the cluster refused the {what}: {message}")
    return BackendError(f"create {what}: {e.status} {e.reason}: {message}")


def _message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or "{}").get("message", "")) or str(e.reason)
    except ValueError:
        return str(e.reason)
