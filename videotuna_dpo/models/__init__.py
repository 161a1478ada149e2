"""Model backends: one protocol for every family, one file per family."""
