"""Stage outputs on disk: atomic folders, the manifest and its checksums, per-component weights, the PEFT sidecar, the training state, and loading a stage output for use."""
