"""serve.py's server: the OpenAI-compatible HTTP API, the engine in a process of its
own driven by one loop, and the load generator benchmark.py sends through it."""
