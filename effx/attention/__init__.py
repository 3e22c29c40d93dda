"""effx/attention."""
