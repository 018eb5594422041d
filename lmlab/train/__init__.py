"""Training: state, optimizer, jitted steps, metrics, checkpoints and the loop that ties them."""
