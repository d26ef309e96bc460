"""The Hub: the only service callers talk to. Authenticates, scopes to a tenant, forwards."""
