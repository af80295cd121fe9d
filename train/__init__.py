"""Training: the pure train step, optimizer, stage recipes and the training loop."""
