"""invalidation."""
