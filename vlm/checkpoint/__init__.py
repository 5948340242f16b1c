"""Stage outputs on disk: written atomically, checksummed, loaded back for use or resume.

Stage outputs on disk: atomic folders, the manifest and its checksums, per-component weights, the PEFT sidecar, the training state, and loading a stage output for use.
"""
