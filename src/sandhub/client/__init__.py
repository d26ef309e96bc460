"""A small typed client for sandhub's two services, sync and async.

    from sandhub.client import Client, Tls, NotFound

    with Client("hub.example:50051", api_key=KEY, tls=Tls.from_files("ca.crt")) as hub:
        c = hub.create_container(image="python", wait_until_running=True)
        hub.put_files(c.container_id, {"main.py": b"print(6 * 7)"})
        print(hub.run(c.container_id, ["python", "main.py"]).stdout)
        hub.delete_container(c.container_id)

Requests are the generated messages of ``sandhub.orchestrator.v1`` and
``sandhub.exec.v1``, built from plain arguments; answers are those messages.
Errors are :class:`ApiError` subclasses carrying the ErrorInfo reason and
metadata. :class:`AsyncClient` is the same for asyncio.
"""

from sandhub.client.aio import AsyncClient, AsyncExecSession
from sandhub.client.connection import Tls
from sandhub.client.errors import (
    AlreadyExists,
    ApiError,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from sandhub.client.sync import Client, ExecSession

__all__ = [
    "AlreadyExists", "ApiError", "AsyncClient", "AsyncExecSession", "Cancelled", "Client", "DeadlineExceeded",
    "ExecSession", "FailedPrecondition", "Internal", "InvalidArgument", "NotFound", "PayloadTooLarge",
    "PermissionDenied", "QuotaExceeded", "RateLimited", "ResourceExhausted", "Tls", "Unauthenticated",
    "Unavailable", "Unimplemented", "from_rpc_error",
]
