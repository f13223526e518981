"""Training: the loops, losses and pseudo-labels."""
