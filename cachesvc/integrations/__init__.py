"""Adapters that plug this cache into other software. Each module imports its host library and
is imported only by a process that has it; nothing in ``cachesvc`` imports these."""
