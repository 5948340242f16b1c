"""Stages, checkpoints and the accelerate-based trainer."""
