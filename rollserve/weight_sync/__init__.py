"""Getting trainer weights into the engine."""
