"""The service stack a gateway test talks to over HTTP, run in the service's own virtualenv.

    python -m tests.gateway.stack [--redis URL] [--production]

Starts the echo upstream (an OpenAI-compatible server around ``EchoUpstream``; ``GET /calls``
counts the requests it answered) and the cache
service (the embedded store, or Redis with ``--redis``) on free loopback ports, prints one JSON
line naming their URLs and keys, and runs until its standard input closes. The LiteLLM tests
and ``bench/gateway.py`` run in a virtualenv with LiteLLM, which must not hold the service's
dependencies, so they start this as a child process of the service's interpreter.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import orjson

from cachesvc.app import create_app
from cachesvc.logs import configure_logging
from tests.service_helpers import ADMIN, KEY_A, KEY_B, fake_openai_app, make_settings, serving
from tests.support.echo_upstream import EchoUpstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=None, help="redis:// URL of the response store")
    parser.add_argument("--production", action="store_true",
                        help="serve as `cachesvc serve` does (uvloop, httptools, 1%% of hits "
                             "audited): for benchmarks")
    args = parser.parse_args()
    configure_logging("WARNING")  # stdout carries only the JSON line
    echo = EchoUpstream()
    model = fake_openai_app(echo)
    model.get("/calls")(lambda: {"calls": echo.calls})  # how often the model was asked
    with tempfile.TemporaryDirectory(prefix="gateway-stack-") as tmp, \
            serving(model) as upstream:
        sampled = {"sample_rate": 0.01, "fill_sample_rate": 0.01} if args.production else {}
        # NOTE: a Redis read slower than timeout_ms is (correctly) a miss, which voids a
        # benchmark of hits; on a loaded machine 500 ms is not always enough.
        store = {"url": args.redis, "timeout_ms": 5000} if args.redis else {}
        settings = make_settings(Path(tmp), upstream={"url": upstream.url + "/v1"},
                                 audit={"oracle": "none", **sampled}, redis=store)
        server = {"loop": "uvloop", "http": "httptools"} if args.production else {}
        with serving(create_app(settings), **server) as service:
            sys.stdout.write(orjson.dumps({
                "service": service.url, "upstream": upstream.url + "/v1",
                "key_a": KEY_A, "key_b": KEY_B, "admin": ADMIN}).decode() + "\n")
            sys.stdout.flush()
            sys.stdin.read()  # until the parent closes the pipe (or dies)


if __name__ == "__main__":
    main()
