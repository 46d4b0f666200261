"""The engine: sampling parameters, KV caches, sampler, stop conditions, metrics, the LLM facade."""
