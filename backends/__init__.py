"""Engine adapters for runnerd: one package per engine, no HTTP server, no scheduling."""
