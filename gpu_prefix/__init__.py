"""gpu_prefix."""
