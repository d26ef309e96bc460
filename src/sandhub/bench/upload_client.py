"""The client side of `sandhub bench exec`'s transfers, run as a process of its
own (as a real caller is): in the bench's process it would share the GIL with
the servers it measures. Prints one JSON line: MB/s per repetition.

    python -m sandhub.bench.upload_client HUB|SINK ADDRESS MIB REPEATS [CONTAINER API_KEY [DOWNLOAD_PATH]]
    python -m sandhub.bench.upload_client AGENT ADDRESS MIB REPEATS CONTAINER AGENT_TOKEN DOWNLOAD_PATH

AGENT calls a sandhub-agent directly (its credential instead of an API key);
its rates are named agent_put_files / agent_get_files.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc

from sandhub import internal_auth
from sandhub.exec.v1 import exec_pb2 as xpb
from sandhub.exec.v1 import exec_pb2_grpc as xpb_grpc

CHUNK = 1 << 20
SINK = "/sandhub.bench.Sink/Put"


def main(argv: list[str]) -> int:
    kind, address, mib, repeats = argv[0], argv[1], int(argv[2]), int(argv[3])
    payload = bytes(range(256)) * (mib * CHUNK // 256)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 8 << 20)])
    rates: dict[str, list[float]] = {}

    def timed(name: str, call: object) -> None:
        start = time.perf_counter()
        call()  # type: ignore[operator]
        rates.setdefault(name, []).append(len(payload) / 1e6 / (time.perf_counter() - start))

    if kind == "sink":
        put: Any = channel.stream_unary(SINK)

        def raw() -> Iterator[bytes]:
            for i in range(0, len(payload), CHUNK):
                yield payload[i:i + CHUNK]

        for _ in range(repeats):
            timed("plain_grpc", lambda: put(raw()))
    else:
        container_id, api_key = argv[4], argv[5]
        path = argv[6] if len(argv) > 6 else "/work/blob.bin"  # where PutFiles puts blob.bin
        prefix = "agent_" if kind == "agent" else ""

        def md(method: str) -> tuple[tuple[str, str], ...]:
            if kind == "agent":  # a fresh nonce per call, as the Hub sends
                return internal_auth.agent_call_metadata(api_key, f"/sandhub.exec.v1.ExecService/{method}")
            return (("authorization", f"Bearer {api_key}"),)
        ex = xpb_grpc.ExecServiceStub(channel)

        def requests() -> Iterator[xpb.PutFilesRequest]:
            yield xpb.PutFilesRequest(start=xpb.PutFilesStart(container_id=container_id))
            yield xpb.PutFilesRequest(file=xpb.FileHeader(path="blob.bin", size=len(payload)))
            for i in range(0, len(payload), CHUNK):
                yield xpb.PutFilesRequest(data=payload[i:i + CHUNK])

        def download() -> None:
            for _ in ex.GetFiles(xpb.GetFilesRequest(container_id=container_id, path=path), metadata=md("GetFiles")):
                pass

        for _ in range(repeats):
            timed(prefix + "put_files", lambda: ex.PutFiles(requests(), metadata=md("PutFiles")))
            timed(prefix + "get_files", download)
    print(json.dumps(rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
