"""How a client reaches a Hub: TLS or plaintext, and the API key per call.

Over TLS the key travels as standard per-call credentials
(``grpc.access_token_call_credentials`` composed with
``grpc.ssl_channel_credentials``), which send ``authorization: Bearer <key>``
on every call and refuse to on a channel without transport security. Over
plaintext (loopback development) the same header is added as metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

MAX_RECEIVE_BYTES = 4 << 20
"""Largest message a client accepts: gRPC's default, which every reply of a
Hub with the default limits fits (a Run at most 2 MiB - 32 KiB per stream).
Raise it only for a Hub whose operator raised ExecLimits.max_output_bytes."""


@dataclass(frozen=True)
class Tls:
    """TLS to the Hub. ``ca_cert`` None trusts the system's roots; a client
    certificate and key are needed when the Hub asks for mTLS."""

    ca_cert: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = field(default=None, repr=False)
    server_name: str = ""
    """Name to check the server certificate against when it is not the target's host."""

    @classmethod
    def from_files(
        cls, ca_file: str | Path | None = None, cert_file: str | Path | None = None,
        key_file: str | Path | None = None, *, server_name: str = "",
    ) -> Tls:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        if bool(cert_file) != bool(key_file):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        return cls(read(ca_file), read(cert_file), read(key_file), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert, private_key=self.client_key, certificate_chain=self.client_cert
        )


def channel_options(tls: Tls | None, max_receive_bytes: int, extra: tuple[tuple[str, Any], ...]) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_receive_bytes)]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options + list(extra)


def bearer(api_key: str) -> tuple[tuple[str, str], ...]:
    """The metadata a plaintext channel sends the key as."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def secure_credentials(tls: Tls, api_key: str) -> grpc.ChannelCredentials:
    """TLS, plus the key as per-call credentials when there is one."""
    creds = tls.credentials()
    if api_key:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(api_key))
    return creds


def sync_channel(target: str, *, api_key: str, tls: Tls | None, options: list[tuple[str, Any]]) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, secure_credentials(tls, api_key), options=options)


def aio_channel(target: str, *, api_key: str, tls: Tls | None, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, secure_credentials(tls, api_key), options=options)
