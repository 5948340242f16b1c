"""Benchmarks behind ``vlm bench``: measurements to report, never timed tests.

Benchmarks (measurements, not tests): vlm against transformers on the same model and data
(``vlm bench train`` / ``vlm bench generate``), the frozen-feature cache (``vlm bench feature-cache``)
and streamed vs map-style data (``vlm bench stream``); each report embeds ``vlm env``.
"""
