"""Lightning training of recurrent-depth models (random depth, truncated backprop)."""
