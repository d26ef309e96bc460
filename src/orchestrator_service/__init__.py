"""The orchestrator: creates, lists, extends and deletes containers on a backend."""
