"""Model components: vision encoders, connectors, the LLM wrapper and the full VLM."""
