"""atoll.parallel: the layout and mesh, and parallelism applied to single-device models."""
