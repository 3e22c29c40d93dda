"""effx/moe."""
