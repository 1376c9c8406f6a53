"""Evaluation: test-time depth sweeps, token-level baselines, latent-versus-CoT comparisons, reports."""
