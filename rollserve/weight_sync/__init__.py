"""Getting trainer weights into the engine."""

from .updater import WeightUpdateError, normalize_name, weights_fingerprint

__all__ = ["WeightUpdateError", "normalize_name", "weights_fingerprint"]
