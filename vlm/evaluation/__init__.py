"""Evaluation: tasks, the official metrics, retrieval, distributed eval, the lmms-eval adapter."""
