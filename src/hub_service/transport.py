"""How the Hub listens: TLS (optionally mutual) from files, or plaintext.

Plaintext is for development on loopback. On any other address it is
refused unless ``allow_plaintext`` says something else encrypts the hop: an
API key sent in clear is a key given away, and the standard per-call
credential helpers of grpc-go and grpc-js will not send one without TLS.
"""

from __future__ import annotations

import ipaddress

import grpc
import structlog

from sandhub import rpc
from sandhub.config import HubConfig

log = structlog.get_logger("sandhub.hub")


def is_loopback(address: str) -> bool:
    """Whether a gRPC listen address ("host:port", "[v6]:port", "unix:...") is
    reachable from this host only. ":port" and "0.0.0.0" are every interface."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or "" (every interface): it may resolve anywhere
        return False


def _read(path: object, what: str) -> bytes:
    try:
        with open(str(path), "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror}") from None


def server_credentials(config: HubConfig) -> grpc.ServerCredentials:
    """TLS with the configured certificate; with a client CA, client
    certificates signed by it are required."""
    cert = _read(config.tls_cert_file, "SANDHUB_HUB_TLS_CERT_FILE")
    key = _read(config.tls_key_file, "SANDHUB_HUB_TLS_KEY_FILE")
    client_ca = _read(config.tls_client_ca_file, "SANDHUB_HUB_TLS_CLIENT_CA_FILE") if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def credentials(config: HubConfig) -> grpc.ServerCredentials | None:
    """The Hub's server credentials, None for plaintext (logged as such).
    Raises ValueError for plaintext on a non-loopback address without
    allow_plaintext, or a certificate file that can't be read."""
    if config.tls_cert_file is not None or config.tls_key_file is not None:
        if config.tls_cert_file is None or config.tls_key_file is None:
            raise ValueError("TLS needs both a certificate and its key (SANDHUB_HUB_TLS_CERT_FILE, _KEY_FILE)")
        creds = server_credentials(config)
        log.info("hub.transport", transport="tls", mutual=config.tls_client_ca_file is not None, listen=config.listen)
        return creds
    if config.tls_client_ca_file is not None:
        raise ValueError("a client CA (mTLS) needs the Hub's own certificate and key too")
    if is_loopback(config.listen):
        log.info("hub.transport", transport="plaintext", listen=config.listen,
                 note="loopback only: development. Set SANDHUB_HUB_TLS_CERT_FILE/_KEY_FILE to serve TLS")
    elif config.allow_plaintext:
        log.warning("hub.plaintext_on_network", listen=config.listen,
                    note="API keys cross the network in clear unless something else encrypts this hop")
    else:
        raise ValueError(
            f"refusing plaintext on {config.listen}, which is not loopback: API keys would cross the network in "
            "clear. Set SANDHUB_HUB_TLS_CERT_FILE and SANDHUB_HUB_TLS_KEY_FILE, or SANDHUB_HUB_ALLOW_PLAINTEXT=true "
            "if a mesh or proxy encrypts the hop")
    return None


def bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    """Adds the Hub's one listening port; returns its number (useful with ":0")."""
    if creds is None:
        return rpc.bind(server, address)
    port = server.add_secure_port(address, creds)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port
