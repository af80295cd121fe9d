"""Checkpoints: PyTorch <-> JAX conversion and Orbax save/restore."""
