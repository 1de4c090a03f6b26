"""atoll.launch: the CLI and the local, Ray and torchrun entry points."""
