"""The client every client verb uses: the Hub with an API key, over TLS or
plaintext as the flags say, or the Orchestrator as the operator."""

from __future__ import annotations

import argparse
import os

from sandhub import config as cfg
from sandhub.client import Client, Tls


def connect(args: argparse.Namespace) -> Client:
    """A client of the Hub with the API key (TLS when --tls/--ca-cert say so);
    or, with --orchestrator, of the Orchestrator itself as the operator (every
    tenant), with its token as credential (the Orchestrator listens in
    plaintext on an internal address)."""
    from sandhub import internal_auth

    if getattr(args, "orchestrator", ""):
        try:
            token = cfg.load_orchestrator_token(dict(os.environ))
        except cfg.ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        if not token:
            raise SystemExit(f"error: --orchestrator needs the token: set {internal_auth.TOKEN_VARIABLES}")
        return Client(args.orchestrator, metadata=internal_auth.metadata(token), timeout_s=args.timeout)
    try:
        tls = Tls.from_files(args.ca_cert or None, args.client_cert or None, args.client_key or None) \
            if args.tls or args.ca_cert or args.client_cert else None
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: TLS: {e}") from None
    return Client(args.hub, api_key=args.api_key, tls=tls, timeout_s=args.timeout)
