"""The speed layer: faster kernels swapped into a built model (each checked against the plain layer it
replaces), the allocator setting for long runs, and `scratchgpt bench`."""
