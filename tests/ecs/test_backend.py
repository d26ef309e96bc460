"""EcsBackend against a moto server on loopback (tests/ecs/moto_aws.py): the
lifecycle, task definitions, tags, status mapping and retries, at the
backend's interface. moto runs no containers: a task is RUNNING with an
ENI address as soon as RunTask answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import botocore.exceptions
import pytest

from orchestrator_service.backends.ecs import tags as t
from orchestrator_service.backends.ecs.backend import EcsBackend
from orchestrator_service.backends.ecs.limiter import Limiter
from orchestrator_service.model import Event, EventType, Port, State
from sandhub import internal_auth
from sandhub.config import Limits
from sandhub.errors import BackendError, BackendUnavailable, InvalidField, QuotaExceeded
from tests.ecs.helpers import AGENT_KEY, RecordingEcs, make_backend, refusal, spec
from tests.ecs.moto_aws import CLUSTER, Aws

T = TypeVar("T")


async def eventually(get: Callable[[], Awaitable[T]], ok: Callable[[T], bool], tries: int = 200) -> T:
    value = await get()
    for _ in range(tries):
        if ok(value):
            return value
        await asyncio.sleep(0.05)
        value = await get()
    return value


@pytest.fixture
async def started(aws: Aws) -> AsyncIterator[tuple[EcsBackend, RecordingEcs, list[Event]]]:
    events: list[Event] = []
    backend, ecs = make_backend(aws, events=events)
    await backend.start()
    yield backend, ecs, events
    await backend.close()


async def test_create_tags_ip_and_placement(started: tuple[EcsBackend, RecordingEcs, list[Event]],
                                            aws: Aws) -> None:
    backend, ecs, events = started
    c = await backend.create(spec=spec(placement="spot", request_id="req/1 ü"), container_id="cnt-aaaaaaaaaaaa")
    assert (c.id, c.tenant, c.state, c.placement, c.request_id) == (
        "cnt-aaaaaaaaaaaa", "tenant-a", State.RUNNING, "spot", "req/1 ü")
    assert c.ip_address and c.endpoints[0].address == f"{c.ip_address}:8000"
    assert c.labels == {"app": "web", "course": "cs101"} and c.env == {"GREETING": "hello"}
    [run] = ecs.called("run_task")
    assert run["startedBy"] == "sandhub-test" and run["enableExecuteCommand"] is False
    assert run["capacityProviderStrategy"] == [{"capacityProvider": "FARGATE_SPOT", "weight": 1}]
    assert run["networkConfiguration"]["awsvpcConfiguration"] == {
        "subnets": [aws.subnet], "securityGroups": [aws.security_group], "assignPublicIp": "DISABLED"}
    assert run["propagateTags"] == "TASK_DEFINITION"
    [task] = aws.tasks("sandhub-test")
    tags = t.from_aws(task["tags"])
    assert tags[t.CONTAINER_ID] == c.id and tags[t.TENANT] == "tenant-a" and tags["app"] == "web"
    assert tags[t.EXPIRE_TIME] == c.expire_time.isoformat() and t.text(tags, t.REQUEST_ID) == "req/1 ü"
    assert task["capacityProviderName"] == "FARGATE_SPOT"
    main, init = task["overrides"]["containerOverrides"]
    assert main["name"] == "main" and init["name"] == "sandhub-agent-init"
    assert {e["name"]: e["value"] for e in main["environment"]} == {"GREETING": "hello", "SANDHUB_CONTAINER_ID": c.id}
    # The credential goes to the init container only (it leaves it in a file for the agent).
    assert init["environment"] == [{"name": "SANDHUB_AGENT_TOKEN", "value": internal_auth.agent_token(AGENT_KEY, c.id)}]
    assert [e.type for e in events] == [EventType.ADDED]


async def test_task_definition_registered_once_and_found_after_restart(
        started: tuple[EcsBackend, RecordingEcs, list[Event]], aws: Aws) -> None:
    backend, ecs, _ = started
    a = await backend.create(spec=spec(), container_id="cnt-aaaaaaaaaaaa")
    b = await backend.create(spec=spec(env={"OTHER": "1"}, labels={}), container_id="cnt-bbbbbbbbbbbb")
    [registered] = ecs.called("register_task_definition")
    definition = aws.client("ecs").describe_task_definition(taskDefinition=registered["family"])["taskDefinition"]
    init, main = definition["containerDefinitions"]
    assert (init["name"], init["essential"], init["image"]) == ("sandhub-agent-init", False,
                                                                "sandhub/sandhub-agent:test")
    assert main["dependsOn"] == [{"containerName": "sandhub-agent-init", "condition": "COMPLETE"}]
    assert main["entryPoint"] == ["/sandhub/sandhub-agent"]
    assert main["command"] == ["--listen", "tcp:0.0.0.0:49983", "--state-dir", "/run/sandhub",
                               "--token-file", "/run/sandhub/agent-token"]
    assert (definition["cpu"], definition["memory"], definition["networkMode"]) == ("1024", "2048", "awsvpc")
    assert "taskRoleArn" not in definition
    tasks = {t.from_aws(x["tags"])[t.CONTAINER_ID]: x["taskDefinitionArn"] for x in aws.tasks()}
    assert tasks[a.id] == tasks[b.id]
    await backend.create(spec=spec(resources=replace(spec().resources, memory_mib=4096)),
                         container_id="cnt-cccccccccccc")
    assert len(ecs.called("register_task_definition")) == 2, "another size is another task definition"
    # A new orchestrator finds the families by name instead of registering again.
    other, other_ecs = make_backend(aws)
    await other.start()
    try:
        await other.create(spec=spec(), container_id="cnt-dddddddddddd")
        assert other_ecs.called("register_task_definition") == []
        assert len(other_ecs.called("describe_task_definition")) == 1
    finally:
        await other.close()


async def test_fargate_sizes_round_up_and_impossible_ones_name_the_nearest(aws: Aws) -> None:
    backend, ecs = make_backend(aws, limits=Limits(max_cpu_millicores=8000, max_memory_mib=8192))
    await backend.start()
    try:
        c = await backend.create(spec=spec(resources=replace(spec().resources, cpu_millicores=300, memory_mib=600)),
                                 container_id="cnt-aaaaaaaaaaaa")
        assert (c.resources.cpu_millicores, c.resources.memory_mib) == (500, 1024)
        with pytest.raises(InvalidField) as e:
            await backend.create(spec=spec(resources=replace(spec().resources, cpu_millicores=8000, memory_mib=512)),
                                 container_id="cnt-bbbbbbbbbbbb")
        assert e.value.field == "resources.cpu_millicores" and "4000m/8192MiB" in e.value.message
        with pytest.raises(InvalidField) as e:
            await backend.create(spec=spec(resources=replace(spec().resources, cpu_millicores=4000, memory_mib=9000)),
                                 container_id="cnt-cccccccccccc")
        assert e.value.field == "resources.memory_mib" and "4000m/8192MiB" in e.value.message
        # EC2 capacity runs any size: nothing rounded.
        ec2 = await backend.create(spec=spec(placement="ec2", resources=replace(
            spec().resources, cpu_millicores=300, memory_mib=600)), container_id="cnt-dddddddddddd")
        assert (ec2.resources.cpu_millicores, ec2.resources.memory_mib) == (300, 600)
        assert ecs.called("run_task")[-1]["capacityProviderStrategy"][0]["capacityProvider"] == "sandhub-ec2"
    finally:
        await backend.close()


async def test_each_create_is_one_run_task_call_with_all_its_tags_and_its_own_credential(
        started: tuple[EcsBackend, RecordingEcs, list[Event]], aws: Aws) -> None:
    backend, ecs, _ = started
    ids = [f"cnt-{i:012d}" for i in range(25)]
    made = await asyncio.gather(*(backend.create(spec=spec(labels={"n": str(i)},
                                                           env={"GREETING": "hello", "SANDHUB_AGENT_TOKEN": "mine"}),
                                                 container_id=cid)
                                  for i, cid in enumerate(ids)))
    calls = ecs.called("run_task")
    # ECS applies a call's overrides to all its tasks: one credential per task
    # is one call per task, every tag on the call itself (nothing tagged after).
    assert [k["count"] for k in calls] == [1] * 25 and ecs.called("tag_resource") == []
    held = {t.from_aws(x["tags"])[t.CONTAINER_ID]: t.from_aws(x["tags"]) for x in aws.tasks()}
    for k in calls:
        cid = t.from_aws(k["tags"])[t.CONTAINER_ID]
        assert t.from_aws(k["tags"]) == held[cid], "the call carries every tag the task holds"
        main, init = k["overrides"]["containerOverrides"]
        # The caller can't choose the agent's variables.
        assert {e["name"]: e["value"] for e in main["environment"]} == {
            "GREETING": "hello", "SANDHUB_CONTAINER_ID": cid}
        assert init == {"name": "sandhub-agent-init", "environment": [
            {"name": "SANDHUB_AGENT_TOKEN", "value": internal_auth.agent_token(AGENT_KEY, cid)}]}
    assert [c.id for c in made] == ids and len({c.ip_address for c in made}) == 25
    assert all(c.env == {"GREETING": "hello"} for c in made), "the agent's variables are not the caller's env"
    assert [backend.agent_target(c) for c in made] == [f"{c.ip_address}:49983" for c in made]
    assert {cid: held[cid]["n"] for cid in ids} == {cid: str(i) for i, cid in enumerate(ids)}
    assert all({t.TENANT, t.EXPIRE_TIME, t.IMAGE, t.RESOURCES, t.PORTS} <= set(held[cid]) for cid in ids)


async def test_delete_stops_the_task_once(started: tuple[EcsBackend, RecordingEcs, list[Event]],
                                          aws: Aws) -> None:
    backend, ecs, events = started
    c = await backend.create(spec=spec(), container_id="cnt-aaaaaaaaaaaa")
    gone = await backend.delete(container_id=c.id, grace_period_s=0, reason="Deleted")
    assert (gone.state, gone.state_reason, gone.ip_address) == (State.TERMINATED, "Deleted", "")
    again = await backend.delete(container_id=c.id, grace_period_s=0, reason="Deleted")
    assert again.state is State.TERMINATED
    assert [k["reason"] for k in ecs.called("stop_task")] == ["sandhub: Deleted"]
    [task] = aws.tasks()
    assert task["lastStatus"] == "STOPPED"


async def test_restart_adopts_containers_from_tags(aws: Aws) -> None:
    first, _ = make_backend(aws)
    await first.start()
    a = await first.create(spec=spec(request_id="r-1"), container_id="cnt-aaaaaaaaaaaa")
    b = await first.create(spec=spec(tenant="tenant-b", placement="spot"), container_id="cnt-bbbbbbbbbbbb")
    await first.delete(container_id=b.id, grace_period_s=0, reason="Deleted")
    await first.close()
    # Someone else's task in the same cluster: not ours, never adopted.
    aws.client("ecs").run_task(cluster=CLUSTER, taskDefinition=aws.tasks()[0]["taskDefinitionArn"],
                               launchType="FARGATE", startedBy="someone-else", networkConfiguration={
                                   "awsvpcConfiguration": {"subnets": [aws.subnet],
                                                           "securityGroups": [aws.security_group]}})
    second, _ = make_backend(aws)
    await second.start()
    try:
        listed = {c.id: c for c in await second.list()}
        assert set(listed) == {a.id, b.id}
        back = listed[a.id]
        assert (back.tenant, back.labels, back.env, back.resources, back.ports, back.ip_address, back.request_id,
                back.expire_time, back.state) == (a.tenant, a.labels, a.env, a.resources, a.ports, a.ip_address,
                                                  "r-1", a.expire_time, State.RUNNING)
        assert (listed[b.id].state, listed[b.id].state_reason, listed[b.id].placement) == (
            State.TERMINATED, "Deleted", "spot")
    finally:
        await second.close()


@pytest.mark.parametrize(("stopped_reason", "reason"), [
    ("CannotPullContainerError: pull image manifest has been retried 5 time(s): not found", "ImagePullFailed"),
    ("Your Spot Task was interrupted.", "SpotInterruption"),
    ("OutOfMemoryError: Container killed due to memory usage", "OOMKilled"),
])
async def test_a_task_ecs_stops_is_failed_with_its_reason(
        started: tuple[EcsBackend, RecordingEcs, list[Event]], aws: Aws, stopped_reason: str, reason: str) -> None:
    backend, _, events = started
    c = await backend.create(spec=spec(), container_id="cnt-aaaaaaaaaaaa")
    [task] = aws.tasks()
    aws.client("ecs").stop_task(cluster=CLUSTER, task=task["taskArn"], reason=stopped_reason)
    # The poller's resync of running tasks notices it.
    failed = await eventually(lambda: backend.get(container_id=c.id), lambda x: x.state is State.FAILED)
    assert (failed.state, failed.state_reason) == (State.FAILED, reason)
    assert stopped_reason in failed.state_message and failed.end_time is not None
    assert events[-1].container.state is State.FAILED
    # Deleting it stops nothing more; it is TERMINATED.
    deleted = await backend.delete(container_id=c.id, grace_period_s=0, reason="Deleted")
    assert deleted.state is State.TERMINATED


async def test_throttling_is_retried_then_unavailable(started: tuple[EcsBackend, RecordingEcs, list[Event]]) -> None:
    backend, ecs, _ = started
    ecs.throttle["run_task"] = 2
    c = await backend.create(spec=spec(), container_id="cnt-aaaaaaaaaaaa")
    assert c.state is State.RUNNING and len(ecs.called("run_task")) == 3
    assert backend.api.stats.throttled == 2
    # Retries reuse the client token: a retried call can't start its tasks twice.
    assert len({k["clientToken"] for k in ecs.called("run_task")}) == 1
    ecs.throttle["run_task"] = 100
    with pytest.raises(BackendUnavailable) as e:
        await backend.create(spec=spec(), container_id="cnt-bbbbbbbbbbbb")
    assert "throttled" in e.value.message and e.value.reason == "BACKEND_UNAVAILABLE"


@pytest.mark.parametrize(("answer", "error", "field"), [
    (refusal("RunTask", "LimitExceededException", "too many tasks"), QuotaExceeded, ""),
    (refusal("RunTask", "ClientException", "unable to resolve image busybox:nope"), InvalidField, "image"),
    (refusal("RunTask", "PlatformTaskDefinitionIncompatibilityException", "no Fargate"), InvalidField, "placement"),
    (refusal("RunTask", "AccessDeniedException", "not authorized"), BackendError, ""),
    ({"tasks": [], "failures": [{"arn": "x", "reason": "RESOURCE:ENI", "detail": "no ENI left"}]},
     BackendUnavailable, ""),
])
async def test_run_task_refusals_are_clear_errors(started: tuple[EcsBackend, RecordingEcs, list[Event]],
                                                  answer: botocore.exceptions.ClientError | dict[str, object],
                                                  error: type[Exception],
                                                  field: str) -> None:
    backend, ecs, events = started
    ecs.instead["run_task"] = answer
    with pytest.raises(error) as e:
        await backend.create(spec=spec(), container_id="cnt-aaaaaaaaaaaa")
    assert type(e.value) is error and getattr(e.value, "field", "") == field
    if isinstance(answer, dict):
        assert "RESOURCE:ENI no ENI left" in str(e.value) and "retry" in str(e.value)
    else:
        assert str(answer.response["Error"]["Message"]) in str(e.value)
    assert len(ecs.called("run_task")) == 1 and await backend.list() == [] and events == []


async def test_a_burst_takes_one_run_task_token_and_one_launch_token_per_create(aws: Aws) -> None:
    backend, ecs = make_backend(aws)
    # The clock stands still: what each bucket lent is exact (rates high, so the waits are short).
    backend.api.limiter = Limiter(call_rates={"run_task": (1000.0, 5)}, default_rate=(0.0, 0),
                                  launch_rate=(1000.0, 10), clock=lambda: 0.0)
    await backend.start()
    try:
        placements = ["default"] * 30 + ["spot"] * 15 + ["ec2"] * 2  # moto's EC2 instance holds 3
        await asyncio.gather(*(backend.create(spec=spec(placement=p), container_id=f"cnt-{i:012d}")
                               for i, p in enumerate(placements)))
        assert len(ecs.called("run_task")) == 47
        limiter = backend.api.limiter
        # A bucket's debt is how long its next caller would wait: tokens taken beyond its burst.
        assert limiter.call("run_task").reserve(0) == pytest.approx((47 - 5) / 1000)
        fargate, spot = limiter.launches("FARGATE"), limiter.launches("FARGATE_SPOT")
        assert fargate is not None and spot is not None
        assert fargate.reserve(0) == pytest.approx((30 - 10) / 1000), "one launch per create"
        assert spot.reserve(0) == pytest.approx((15 - 10) / 1000), "Spot counted apart; EC2 not at all"
    finally:
        await backend.close()


async def test_ecs_limits_on_labels_and_environment(started: tuple[EcsBackend, RecordingEcs, list[Event]]) -> None:
    backend, _, _ = started
    with pytest.raises(InvalidField) as e:
        await backend.create(spec=spec(labels={f"k{i}": "v" for i in range(t.MAX_LABELS + 1)}),
                             container_id="cnt-aaaaaaaaaaaa")
    assert e.value.field == "labels"
    with pytest.raises(InvalidField) as e:
        await backend.create(spec=spec(env={"BIG": "x" * 7000}), container_id="cnt-aaaaaaaaaaaa")
    assert e.value.field == "env"


async def test_expiry_is_a_tag(started: tuple[EcsBackend, RecordingEcs, list[Event]], aws: Aws) -> None:
    backend, _, _ = started
    c = await backend.create(spec=spec(), container_id="cnt-aaaaaaaaaaaa")
    later = c.expire_time.replace(microsecond=0) + (c.expire_time - c.create_time)
    extended = await backend.set_expiry(container_id=c.id, expire_time=later)
    assert extended.expire_time == later
    [task] = aws.tasks()
    assert t.from_aws(task["tags"])[t.EXPIRE_TIME] == later.isoformat()


async def test_adoption_pages_through_list_tasks_and_takes_only_tagged_tasks(aws: Aws) -> None:
    first, _ = make_backend(aws)
    await first.start()
    made = await asyncio.gather(*(first.create(spec=spec(labels={"n": str(i)}), container_id=f"cnt-{i:012d}")
                                  for i in range(5)))
    await first.close()
    # Our startedBy without our tags: sandhub never starts one (RunTask tags
    # the task as it starts it), so it is someone's by hand; left alone.
    aws.client("ecs").run_task(
        cluster=CLUSTER, taskDefinition=aws.tasks()[0]["taskDefinitionArn"], launchType="FARGATE",
        startedBy="sandhub-test", networkConfiguration={"awsvpcConfiguration": {
            "subnets": [aws.subnet], "securityGroups": [aws.security_group]}})
    second, ecs = make_backend(aws)
    ecs.list_page = 2
    await second.start()
    try:
        assert sorted(c.id for c in await second.list()) == sorted(c.id for c in made)
        ours = [k for k in ecs.called("list_tasks") if k.get("startedBy") == "sandhub-test"]
        assert len(ours) == 3  # 6 tasks, 2 a page
        assert all(not ("startedBy" in k and "desiredStatus" in k) for k in ecs.called("list_tasks")), \
            "ECS takes startedBy only as the sole filter"
        assert ecs.called("stop_task") == []
    finally:
        await second.close()


async def test_a_task_whose_run_task_answer_was_lost_is_adopted(aws: Aws) -> None:
    backend, ecs = make_backend(aws, retries=0)
    await backend.start()
    try:
        # ECS started the task, but its answer never came (a timeout; or the
        # orchestrator stopped in between): the create heard UNAVAILABLE.
        ecs.instead["run_task"] = botocore.exceptions.ReadTimeoutError(endpoint_url=aws.endpoint)
        with pytest.raises(BackendUnavailable):
            await backend.create(spec=spec(), container_id="cnt-aaaaaaaaaaaa")
        [call] = ecs.called("run_task")
        aws.client("ecs").run_task(**call)
        # The task is the record: the next resync finds it, and it expires at its time.
        [found] = await eventually(backend.list, lambda cs: bool(cs))
        assert (found.id, found.state, found.tenant) == ("cnt-aaaaaaaaaaaa", State.RUNNING, "tenant-a")
    finally:
        await backend.close()


async def test_readiness_comes_from_one_describe_loop_for_all_tasks(aws: Aws) -> None:
    events: list[Event] = []
    # The loop's rounds are driven by hand here (poll_once), so what one round costs is exact.
    backend, ecs = make_backend(aws, events=events, launch_burst=200, read_burst=500, poll_interval_s=600.0)
    ecs.provisioning = True
    await backend.start()
    try:
        made = await asyncio.gather(*(backend.create(spec=spec(), container_id=f"cnt-{i:012d}") for i in range(150)))
        assert {c.state for c in made} == {State.PENDING}
        assert backend._poller is not None
        await backend._poller.poll_once(everything=False)
        assert [len(k["tasks"]) for k in ecs.called("describe_tasks")] == [100, 50]
        running = await backend.list()
        assert len(running) == 150 and all(c.state is State.RUNNING and c.ip_address for c in running)
        # Each container heard of its own readiness (the domain's waiters resolve on these).
        assert sum(1 for e in events if e.container.state is State.RUNNING) == 150
    finally:
        await backend.close()


async def test_resync_finds_tasks_another_orchestrator_started(aws: Aws) -> None:
    one, _ = make_backend(aws)
    two, _ = make_backend(aws)
    await one.start()
    await two.start()
    try:
        c = await one.create(spec=spec(), container_id="cnt-aaaaaaaaaaaa")
        seen = await eventually(two.list, lambda cs: bool(cs))
        assert [x.id for x in seen] == [c.id]
    finally:
        await one.close()
        await two.close()


async def test_creates_waiting_for_the_limiter_fail_cleanly_on_close(aws: Aws) -> None:
    backend, ecs = make_backend(aws, launch_burst=1, launch_rate=0.01)
    await backend.start()
    first = await backend.create(spec=spec(), container_id="cnt-aaaaaaaaaaaa")  # takes the only token
    waiting = [asyncio.ensure_future(backend.create(spec=spec(env={"N": str(i)}), container_id=f"cnt-{i:012d}"))
               for i in range(3)]
    await asyncio.sleep(0.2)
    assert not any(w.done() for w in waiting), "the limiter holds them (0.01 launches a second)"
    await backend.close()
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert all(isinstance(r, BackendUnavailable) for r in results) and first.state is State.RUNNING
    assert len(ecs.called("run_task")) == 1
    with pytest.raises(BackendUnavailable) as e:
        await backend.create(spec=spec(), container_id="cnt-bbbbbbbbbbbb")
    assert e.value.message == "the orchestrator is stopping; retry"


async def test_a_port_that_is_the_agents_is_refused(started: tuple[EcsBackend, RecordingEcs, list[Event]]) -> None:
    backend, ecs, _ = started
    with pytest.raises(InvalidField) as e:
        await backend.create(spec=spec(ports=(Port(8000), Port(49983))), container_id="cnt-aaaaaaaaaaaa")
    assert e.value.field == "ports[1].port" and ecs.called("run_task") == []
