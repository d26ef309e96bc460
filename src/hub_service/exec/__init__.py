"""ExecService on the Hub: files, runs, interactive streams and background
processes, built once on top of each backend's exec driver."""
