"""effx: a JAX research framework for efficient transformers.

Floors (imports only run downward):
  pallas_kernels -> layers -> attention / moe -> model -> decoding, train -> experiments.
"""

__version__ = "0.1.0"
