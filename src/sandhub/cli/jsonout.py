"""--json output: proto messages in the proto3 JSON mapping, and bytes as
text when they are UTF-8, base64 when not."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from google.protobuf import json_format


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def message_dict(message: Any) -> dict[str, Any]:
    """A message in the proto3 JSON mapping, with zero values (exit code 0,
    created false) present so scripts needn't know proto3 omits them."""
    out: dict[str, Any] = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return out


def output_fields(name: str, data: bytes) -> dict[str, str]:
    """``{name: text}`` when the bytes are UTF-8, else ``{name + "Base64": ...}``:
    what every --json output does with a command's bytes."""
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {name + "Base64": base64.b64encode(data).decode("ascii")}


def json_line(value: dict[str, Any]) -> None:
    """One object per line, flushed: for streams (exec, attach)."""
    sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")
    sys.stdout.flush()
