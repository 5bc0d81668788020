"""Runtime: KV cache, attention batch addressing, sampling and the generation session."""
