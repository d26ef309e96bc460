"""The local backend: containers as namespaced process trees on this host."""
