"""Adapters into RL training loops (TRL, DeepSpeed, Ray)."""
