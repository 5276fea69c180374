"""Graph rewrites, one per module; ``fxq.pipeline`` composes them in order."""
