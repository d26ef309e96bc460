"""sandhub: isolated containers over gRPC.

This package holds the generated contract stubs (``sandhub.<service>.v1``),
the shared runtime pieces of both services and the ``sandhub`` command line.
"""
