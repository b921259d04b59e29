"""The four conversion stages, in order. Each module exposes `run(ctx)`."""
