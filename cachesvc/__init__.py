"""cachesvc."""
