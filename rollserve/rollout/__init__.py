"""Rollout API, dataset generation and server (built on `rollserve.LLM`)."""
