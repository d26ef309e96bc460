"""The Hub's signature of one agent call (internal_auth.agent_call_auth): the
agent (agent/server/auth.go) checks the same bytes, so both sides share this
vector; the credential itself is never part of the metadata."""

from __future__ import annotations

from sandhub import internal_auth

TOKEN = "test-token-0123456789abcdef"
NONCE = "0123456789abcdef0123456789abcdef"
RUN = "/sandhub.exec.v1.ExecService/Run"


def test_the_shared_vector() -> None:
    assert internal_auth.agent_call_auth(TOKEN, NONCE, RUN) == \
        "87ad6d591e471d2109a3a46f4568c8ca17e1ad20f16e03564f64cf65410a41a8"


def test_it_binds_the_method_and_the_nonce_and_is_not_a_proof() -> None:
    signed = internal_auth.agent_call_auth(TOKEN, NONCE, RUN)
    assert signed != internal_auth.agent_call_auth(TOKEN, NONCE, "/sandhub.exec.v1.ExecService/GetFiles")
    assert signed != internal_auth.agent_call_auth(TOKEN, NONCE[::-1], RUN)
    assert signed != internal_auth.agent_proof(TOKEN, NONCE)


def test_the_metadata_holds_no_credential() -> None:
    metadata = dict(internal_auth.agent_call_metadata(TOKEN, RUN))
    assert set(metadata) == {internal_auth.AGENT_NONCE_KEY, internal_auth.AGENT_AUTH_KEY}
    assert TOKEN not in "".join(metadata.values())
    assert metadata[internal_auth.AGENT_AUTH_KEY] == internal_auth.agent_call_auth(
        TOKEN, metadata[internal_auth.AGENT_NONCE_KEY], RUN)
