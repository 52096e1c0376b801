"""vLLM: install, argv, memory estimate."""
