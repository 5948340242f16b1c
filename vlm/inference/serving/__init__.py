"""`vlm serve`: an OpenAI-compatible chat completions server with a small web page."""
