"""ExecService on the Hub: every call relayed to the sandhub-agent inside the
container (relay.py), found through the Orchestrator (agents.py)."""
