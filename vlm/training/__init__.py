"""Training a stage: what trains, objectives, the loop, strategies and the trainer's callbacks."""
