"""What one access-log line costs: CPU per line written through the service's structlog
configuration (JSON renderer, written to a discarded stream), against the same call with the
logger filtered off (the baseline: the call itself and its arguments), in one run.

    python bench/access_log.py [--lines 20000] [--rounds 5]

Compare the result with the server CPU per hit that ``bench/service.py`` prints: that ratio is
what logging every hit would add, and why ``[logging] access_log_max_per_s`` bounds successes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    out = sys.stdout
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the logger's stream, for the run
    import structlog

    from cachesvc.access_log import log_access
    from cachesvc.logs import configure_logging

    def per_line() -> float:
        best = float("inf")
        for _ in range(args.rounds):
            t0 = time.process_time()
            for _ in range(args.lines):
                log_access(method="POST", route="/v1/chat/completions", status=200,
                           cache="HIT", tenant="team-a", latency_s=0.0003, digest=b"\1" * 16)
            best = min(best, (time.process_time() - t0) / args.lines)
        return best

    # Baseline first, uncached, so the service's configuration can replace it afterwards.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
                        cache_logger_on_first_use=False)
    baseline = per_line()
    structlog.reset_defaults()
    configure_logging("INFO", json=True)
    logged = per_line()
    print(f"access line: {logged * 1e6:.1f} us CPU; filtered-off call: {baseline * 1e6:.2f} us; "
          f"the line's own cost: {(logged - baseline) * 1e6:.1f} us "
          f"(best of {args.rounds} x {args.lines})", file=out)


if __name__ == "__main__":
    main()
