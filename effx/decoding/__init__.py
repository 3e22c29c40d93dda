"""effx/decoding."""
