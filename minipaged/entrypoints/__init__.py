"""How people reach the engine: the offline `LLM` API, the command line, the HTTP server."""
