"""API keys (`authorization: Bearer <key>`) mapped to tenants by configuration."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import grpc

from sandhub import rpc
from sandhub.errors import InvalidCredentials, MissingCredentials


class ApiKeyAuth:
    def __init__(self, keys: Mapping[str, str]) -> None:
        self._keys = dict(keys)

    def tenant(self, context: rpc.Ctx) -> str:
        """The caller's tenant; raises UNAUTHENTICATED errors."""
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                header = value
                break
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise MissingCredentials()
        token = token.strip()
        found = ""
        for known, tenant in self._keys.items():
            # Compare every key in constant time, so timing tells nothing.
            if hmac.compare_digest(known.encode(), token.encode()):
                found = tenant
        if not found:
            raise InvalidCredentials()
        rpc.set_tenant(found)
        return found
