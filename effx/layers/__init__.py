"""effx/layers."""
