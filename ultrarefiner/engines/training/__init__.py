"""Training steps, per-phase set-up and training handlers."""
