"""Evaluation harness: each benchmark a `python -m g4v_jax.eval.<name>` writing a JSON report and a Markdown table."""
