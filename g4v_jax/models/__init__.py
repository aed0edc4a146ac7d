"""Flax NNX modules, one paper concept per file."""
