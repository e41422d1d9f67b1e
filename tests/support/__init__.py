"""Test support shared by the tests and the benchmarks; not part of the product.

* :mod:`tests.support.redis_servers` and :mod:`tests.support.redis_cluster`: real
  ``redis-server`` processes (standalone, and a 3-node cluster) driven through redis-py;
* :mod:`tests.support.echo_upstream`: a deterministic OpenAI-compatible upstream;
* :mod:`tests.support.clock`: a clock a test moves by hand;
* :mod:`tests.support.waiting`: waiting for another thread to get somewhere.

NOTE: it lives under ``tests/`` so the installed packages never carry a test double (only
``keying``, ``invalidation``, ``gpu_prefix``, ``audit`` and ``cachesvc`` are packaged);
benchmarks run from a checkout with its root on ``sys.path`` and import it as ``tests.support``.
"""
