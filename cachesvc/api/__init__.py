"""HTTP routers: the proxy, the cache API, admin, and health/metrics."""
