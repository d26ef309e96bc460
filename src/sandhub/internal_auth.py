"""The credential between the Hub and the Orchestrator.

The Orchestrator believes the tenant a call names (``x-sandhub-tenant``; none
means the operator, who sees every tenant), so only callers holding a shared
secret token may call it: the Hub, whose channel adds the token to every call
(no call can forget it), and an operator who has it. The Orchestrator checks
it before any handler runs; a call without it is UNAUTHENTICATED.

Open without the token: health checking (Kubernetes' gRPC probes send no
metadata) and reflection (it serves the contracts' schema, which is public).

A shared secret, not mTLS or a unix socket: the two services run on one host
(local backend) or as two Deployments (Kubernetes), and one secret file works
for both with no PKI to run; the Hub's channel stays plaintext inside the
cluster as before. Keys derived from it for other internal callers (per-container
agent credentials) belong in this module too.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog

from sandhub import rpc
from sandhub.config import ConfigError, check_token
from sandhub.errors import InvalidCredentials, MissingCredentials, SandhubError

log = structlog.get_logger("sandhub.internal_auth")

TOKEN_KEY = "x-sandhub-orchestrator-token"
"""Metadata that carries the token. Not ``authorization``: that is where a
caller puts a Hub API key, and a Hub key must never open the Orchestrator."""
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Method prefixes callable without the token."""
TOKEN_VARIABLES = "SANDHUB_ORCHESTRATOR_TOKEN_FILE (or SANDHUB_ORCHESTRATOR_TOKEN)"


class MissingToken(MissingCredentials):
    def __init__(self) -> None:
        SandhubError.__init__(
            self,
            "the Orchestrator is internal: only the Hub and the operator may call it; "
            f"send metadata `{TOKEN_KEY}: <token>` (call the Hub with an API key instead)",
        )


class InvalidToken(InvalidCredentials):
    def __init__(self) -> None:
        SandhubError.__init__(self, f"the `{TOKEN_KEY}` metadata is not the Orchestrator's token")


def new_token() -> str:
    """A random token (256 bits) for when both services run in one process."""
    return secrets.token_hex(32)


def require_token(token: str, *, who: str) -> str:
    """``token`` if it is usable; else ConfigError saying how to set one."""
    if not token:
        raise ConfigError(
            f"{who}: no orchestrator token: set {TOKEN_VARIABLES} to the same secret for the Hub and the "
            "Orchestrator (`openssl rand -hex 32`), or run both in one `sandhub serve`"
        )
    check_token(token, who)
    return token


def metadata(token: str) -> tuple[tuple[str, str]]:
    """The metadata that authenticates a call (operator tools, tests)."""
    return ((TOKEN_KEY, token),)


# -- per-container agent credentials ------------------------------------------------
# The contract is in proto/sandhub/internal/v1/agents.proto (AgentDirectoryService's
# comment); the agent (agent/) implements the other half.

AGENT_NONCE_KEY = "x-sandhub-agent-nonce"
AGENT_AUTH_KEY = "x-sandhub-agent-auth"
"""The Hub's signature of one call (agent_call_auth): the credential itself is
never sent, so an address handed on to another container (a pod IP reused)
learns nothing it could replay elsewhere."""
AGENT_PROOF_KEY = "x-sandhub-agent-proof"
_AGENT_KEY_LABEL = b"sandhub agent key v1"


def agent_key(orchestrator_token: str) -> bytes:
    """The key every agent credential derives from. Never leaves the Hub and the
    Orchestrator: an agent gets only its own container's credential."""
    return hmac.new(orchestrator_token.encode(), _AGENT_KEY_LABEL, "sha256").digest()


def agent_token(key: bytes, container_id: str) -> str:
    """The credential of one container's agent (what the agent is started with,
    and what the Hub sends it)."""
    return hmac.new(key, container_id.encode(), "sha256").hexdigest()


def new_agent_nonce() -> str:
    return secrets.token_hex(16)


def agent_call_auth(token: str, nonce: str, method: str) -> str:
    """What the Hub sends an agent holding ``token`` with one call: signs the
    nonce and the full method name ("/sandhub.exec.v1.ExecService/Run"), with a
    "hub" label so it can never be mistaken for an agent's proof."""
    message = b"hub\x00" + nonce.encode() + b"\x00" + method.encode()
    return hmac.new(token.encode(), message, "sha256").hexdigest()


def agent_call_metadata(token: str, method: str, nonce: str = "") -> tuple[tuple[str, str], ...]:
    """The metadata one call to an agent carries (``nonce``: a fresh one by
    default); for tools and tests that call an agent directly."""
    nonce = nonce or new_agent_nonce()
    return ((AGENT_NONCE_KEY, nonce), (AGENT_AUTH_KEY, agent_call_auth(token, nonce, method)))


def agent_proof(token: str, nonce: str) -> str:
    """What an agent holding ``token`` answers to ``nonce``."""
    return hmac.new(token.encode(), nonce.encode(), "sha256").hexdigest()


def proof_ok(token: str, nonce: str, proof: str) -> bool:
    return hmac.compare_digest(agent_proof(token, nonce), proof)


# -- the caller's side --------------------------------------------------------------


class _TokenClientInterceptor:
    """Puts the token on every call of the channel, replacing any the call set.

    Used through the four one-kind subclasses below: grpc.aio files an
    interceptor under the first call kind it implements only (an if/elif on
    isinstance), so one object implementing all four left streamed calls
    (WatchContainers) without the token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        pairs = [(k, v) for k, v in (details.metadata or ()) if k != TOKEN_KEY]
        return grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=grpc.aio.Metadata(*pairs, (TOKEN_KEY, self._token)),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _UnaryUnaryToken(_TokenClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    pass


class _UnaryStreamToken(_TokenClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    pass


class _StreamUnaryToken(_TokenClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    pass


class _StreamStreamToken(_TokenClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    pass


def orchestrator_channel(
    address: str, token: str, *, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel to the Orchestrator whose every call carries ``token``."""
    kinds = (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)
    return grpc.aio.insecure_channel(
        address, options=list(options), interceptors=[kind(token) for kind in kinds]
    )


# -- the Orchestrator's side --------------------------------------------------------


class TokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call reach its handler only with the token (OPEN_METHODS aside).

    Goes after rpc.CanonicalInterceptor, so a refused call still gets its one
    log line; the refusal is logged with method, peer and why, never the
    token. A refused call's request is not even parsed."""

    def __init__(self, token: str) -> None:
        self._token = require_token(token, who="orchestrator").encode()

    def _problem(self, invocation_metadata: Sequence[tuple[str, str | bytes]] | None) -> SandhubError | None:
        sent = [v for k, v in invocation_metadata or () if k == TOKEN_KEY]
        if not sent:
            return MissingToken()
        value = sent[0]
        if len(sent) != 1 or not isinstance(value, str):
            return InvalidToken()
        if not hmac.compare_digest(value.encode(), self._token):
            return InvalidToken()
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)  # a look-up: nothing runs yet
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata)
        return handler if problem is None else _refusing(handler, method, problem)


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, problem: SandhubError
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` that only aborts."""

    async def refuse(context: rpc.Ctx) -> None:
        log.warning("orchestrator.call_refused", method=method, peer=context.peer(), reason=problem.reason)
        await context.abort_with_status(rpc.error_status(problem))

    async def unary(_request: Any, context: rpc.Ctx) -> None:
        await refuse(context)

    async def stream(_request: Any, context: rpc.Ctx) -> AsyncIterator[None]:
        await refuse(context)
        yield  # pragma: no cover  (abort raises; this makes it a generator)

    def ignore(_data: bytes) -> None:
        return None

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=ignore)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, request_deserializer=ignore)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=ignore)
    return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=ignore)
