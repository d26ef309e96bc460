"""Host-wide uid claims (backends/local/uids.py) with two owners sharing one
claims directory, as two orchestrators on one host do; the claims directory
and the state directories are the test's own."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from orchestrator_service.backends.local import uids as uids_mod
from orchestrator_service.backends.local.store import Record, Runtime, Store
from orchestrator_service.backends.local.uids import UidClaims
from orchestrator_service.model import Container, ContainerSpec, Resources, State, utcnow
from sandhub.errors import QuotaExceeded


def claims(tmp_path: Path, owner: str, count: int = 16) -> UidClaims:
    c = UidClaims(tmp_path / "uids", base=300000, count=count, owner=tmp_path / owner)
    c.prepare()
    return c


def record(owner: Path, container_id: str, uid: int, state: State) -> None:
    spec = ContainerSpec(tenant="t", image="host", resources=Resources(1000, 512, 256, 1024, 1024), env={},
                         labels={}, ttl_s=60, ports=(), placement="default", request_id="")
    c = Container.from_spec(spec, id=container_id, backend="local", now=utcnow()).with_state(state)
    store = Store(owner)
    store.prepare()
    store.save(Record(c, Runtime(host_uid=uid)))


def age(c: UidClaims, uid: int) -> None:
    """Makes a claim older than the grace a fresh claim gets."""
    old = os.stat(c.path(uid)).st_mtime - 2 * uids_mod.FRESH_S
    os.utime(c.path(uid), (old, old))


def test_two_owners_never_get_the_same_uid(tmp_path: Path) -> None:
    a, b = claims(tmp_path, "a", count=64), claims(tmp_path, "b", count=64)
    got: list[int] = []
    lock = threading.Lock()

    def take(owner: UidClaims, n: int) -> None:
        for i in range(n):
            uid = owner.claim(f"cnt-{id(owner)}-{i}")
            with lock:
                got.append(uid)

    threads = [threading.Thread(target=take, args=(o, 32)) for o in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 64 and len(set(got)) == 64
    with pytest.raises(QuotaExceeded) as e:
        a.claim("cnt-one-too-many")  # all held (and fresh): none is taken over
    assert e.value.metadata["limit"] == "uid_count"


def test_release_frees_only_the_owners_claim(tmp_path: Path) -> None:
    a, b = claims(tmp_path, "a"), claims(tmp_path, "b")
    uid = a.claim("cnt-a")
    b.release(uid, "cnt-a")  # not b's
    a.release(uid, "cnt-other")  # not this container's
    assert a.path(uid).exists()
    a.release(uid, "cnt-a")
    assert not a.path(uid).exists()
    assert b.claim("cnt-b") == uid  # free again, for anyone


def test_adopt_keeps_live_claims_and_drops_leftovers(tmp_path: Path) -> None:
    a = claims(tmp_path, "a")
    live, left = a.claim("cnt-live"), a.claim("cnt-crashed-before-record")
    os.unlink(a.path(live))  # e.g. containers started before claims existed
    restarted = claims(tmp_path, "a")
    restarted.adopt({live: "cnt-live"})
    assert a.path(live).exists() and not a.path(left).exists()
    # Another owner's claim is never dropped by adoption.
    b = claims(tmp_path, "b")
    theirs = b.claim("cnt-b")
    restarted.adopt({live: "cnt-live"})
    assert b.path(theirs).exists()


def test_stale_claims_are_taken_over_only_when_no_uid_is_free(tmp_path: Path) -> None:
    a, b = claims(tmp_path, "a", count=4), claims(tmp_path, "b", count=4)
    owner = tmp_path / "a"
    held = {a.claim(f"cnt-{i}"): f"cnt-{i}" for i in range(4)}
    states = [State.RUNNING, State.TERMINATED, State.FAILED, State.PENDING]
    for (uid, cid), state in zip(sorted(held.items()), states):
        record(owner, cid, uid, state)
        age(a, uid)
    # cnt-0 RUNNING with no init recorded and cnt-3 PENDING: still held.
    # cnt-1 and cnt-2 are over: their uids go to b.
    first, second = b.claim("cnt-b1"), b.claim("cnt-b2")
    assert {first, second} == {sorted(held)[1], sorted(held)[2]}
    with pytest.raises(QuotaExceeded):
        b.claim("cnt-b3")
    # A record that names another uid, or no record at all: stale too.
    uid0 = sorted(held)[0]
    record(owner, "cnt-0", uid0 + 100, State.RUNNING)
    assert b.claim("cnt-b3") == uid0
    os.unlink(Store(owner).path("cnt-3"))
    age(a, sorted(held)[3])
    assert b.claim("cnt-b4") == sorted(held)[3]


def test_a_fresh_claim_is_never_stale(tmp_path: Path) -> None:
    a, b = claims(tmp_path, "a", count=1), claims(tmp_path, "b", count=1)
    a.claim("cnt-no-record-yet")  # its owner is about to write the record
    with pytest.raises(QuotaExceeded):
        b.claim("cnt-b")


def test_a_uid_a_process_still_runs_as_is_never_taken_over(tmp_path: Path) -> None:
    """Found in review: a FAILED or TERMINATING record whose teardown left
    processes behind made the claim look stale, and its uid went to a new
    container while the old processes still ran as it."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.fail("needs root and setpriv (CI runs as root)")
    a, b = claims(tmp_path, "a", count=1), claims(tmp_path, "b", count=1)
    uid = a.claim("cnt-left")
    record(tmp_path / "a", "cnt-left", uid, State.FAILED)
    age(a, uid)
    leftover = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "30"])
    try:
        for _ in range(500):  # until it runs as uid
            if uid in uids_mod.uids_running():
                break
            time.sleep(0.01)
        with pytest.raises(QuotaExceeded):
            b.claim("cnt-b")
    finally:
        leftover.kill()
        leftover.wait()
    assert b.claim("cnt-b") == uid  # gone: now it may be taken over
