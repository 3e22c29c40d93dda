"""effx/pallas_kernels."""
