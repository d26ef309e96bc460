"""Every error sandhub can raise keeps to the contract's ErrorReason comment
(errors.proto): its reason is an ErrorReason, its ErrorInfo metadata uses only
the documented keys, and its status carries ErrorInfo, the typed ErrorDetail, a
BadRequest exactly when it names a field, and RetryInfo when it says when to
retry. Pure: no server (tests/integration/test_error_details.py sends them)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

import hub_service
import orchestrator_service
import sandhub
from sandhub.common.v1 import errors_pb2
from sandhub.errors import METADATA_KEYS, InvalidField, SandhubError
from sandhub.rpc import STATUS_DETAILS_KEY, error_status

FIELD_REASONS = {"INVALID_FIELD", "UNKNOWN_IMAGE", "UNKNOWN_PLACEMENT", "INVALID_PAGE_TOKEN"}
"""The reasons whose metadata has "field" and whose status has a BadRequest."""
ARGUMENTS: dict[str, Any] = {"str": "x", "int": 7, "float": 1.5, "list[str]": ["a", "b"]}
"""A value for each parameter type the error constructors take."""


def _all_subclasses(cls: type[SandhubError]) -> Iterator[type[SandhubError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _import_everything() -> None:
    """Every module of the three packages, so that each error class is defined."""
    for package in (sandhub, hub_service, orchestrator_service):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)


def _instance(cls: type[SandhubError]) -> SandhubError:
    """``cls`` built with a plain value for every argument it requires."""
    if cls.__name__ == "AgentError":  # an agent's status rebuilt: its code and reason are arguments
        return cls(grpc.StatusCode.NOT_FOUND, "PATH_NOT_FOUND", "no such path", {"path": "p"})  # type: ignore[call-arg]
    kwargs: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is not param.empty:
            continue
        assert param.annotation in ARGUMENTS, f"{cls.__qualname__}({name}: {param.annotation}): add a value"
        kwargs[name] = ARGUMENTS[param.annotation]
    return cls(**kwargs)


_import_everything()
ERRORS = [SandhubError, *sorted(set(_all_subclasses(SandhubError)), key=lambda c: c.__module__ + c.__qualname__)]


def test_every_module_defines_its_errors_where_this_test_sees_them() -> None:
    names = {c.__name__ for c in ERRORS}
    assert {"ContainerNotFound", "InvalidField", "OrchestratorUnavailable", "WatchOverflow"} <= names


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__qualname__)
def test_reason_and_metadata_keys_are_the_contracts(cls: type[SandhubError]) -> None:
    err = _instance(cls)
    assert "ERROR_REASON_" + err.reason in errors_pb2.ErrorReason.keys()
    assert err.reason != "UNSPECIFIED"
    assert set(err.metadata) <= METADATA_KEYS, set(err.metadata) - METADATA_KEYS
    assert ("field" in err.metadata) == (err.reason in FIELD_REASONS), (err.reason, err.metadata)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__qualname__)
def test_the_status_carries_every_detail_the_contract_promises(cls: type[SandhubError]) -> None:
    err = _instance(cls)
    status = error_status(err)
    assert status.code is err.code
    details = status_pb2.Status.FromString(dict(status.trailing_metadata)[STATUS_DETAILS_KEY]).details
    info, typed = error_details_pb2.ErrorInfo(), errors_pb2.ErrorDetail()
    bad, retry = error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
    assert [d.Unpack(info) for d in details].count(True) == 1
    assert [d.Unpack(typed) for d in details].count(True) == 1
    assert (info.domain, info.reason, dict(info.metadata)) == ("sandhub.dev", err.reason, err.metadata)
    assert errors_pb2.ErrorReason.Name(typed.reason) == "ERROR_REASON_" + err.reason
    has_bad = any(d.Unpack(bad) for d in details)
    assert has_bad == ("field" in err.metadata)
    if has_bad:
        assert [v.field for v in bad.field_violations] == [err.metadata["field"]]
    assert any(d.Unpack(retry) for d in details) == (err.reason == "RATE_LIMITED")


def test_an_unlisted_metadata_key_or_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="request_id"):
        SandhubError("boom", metadata={"request_id": "r-1"})
    with pytest.raises(TypeError, match="ErrorReason"):
        type("Made", (SandhubError,), {"reason": "SOMETHING_NEW"})


def test_caller_input_in_metadata_stays_valid_utf8_and_short() -> None:
    status = error_status(InvalidField("labels[" + "\udcff" * 1000 + "]", "bad"))
    details = status_pb2.Status.FromString(dict(status.trailing_metadata)[STATUS_DETAILS_KEY]).details
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in details)
    assert len(info.metadata["field"]) < 400 and info.metadata["field"].startswith("labels[\\udcff")
    assert grpc.StatusCode.INVALID_ARGUMENT is status.code
