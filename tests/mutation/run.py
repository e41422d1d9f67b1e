"""Run mutmut over the correctness core one module at a time and print each module's score.

``make mutation`` runs this. Each module's mutants run (one worker, niced) against the fast
tests that execute the mutated function (mutmut maps them in its stats run; the selection is
``[tool.mutmut] pytest_add_cli_args_test_selection`` in pyproject.toml). The score leaves out the
equivalent mutants listed in ``tests/mutation/equivalents.md``: a listed mutant whose mutated
line no longer matches the list is counted as it ran (and reported as stale).

    python -m tests.mutation.run                  # every mutant of every module
    python -m tests.mutation.run --sample 60      # a seeded sample of 60 per module
    python -m tests.mutation.run --score-only     # scores of what mutants/ already holds
    python -m tests.mutation.run keying/scope.py  # one module
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

#: The correctness core: the files ``[tool.mutmut] only_mutate`` names, in run order.
MODULES: list[str] = tomllib.loads(
    (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["tool"]["mutmut"][
    "only_mutate"]
EQUIVALENTS = Path("tests/mutation/equivalents.md")
_EQUIVALENT = re.compile(r"^- `(?P<name>[^`]+)` — `(?P<line>.*)` — (?P<why>.+)$")
KILLED = {1, 3}
TIMEOUT = {24, -24, 152, 255, 36}


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def meta(path: str) -> dict[str, int | None]:
    f = Path("mutants") / (path + ".meta")
    if not f.exists():
        return {}
    return json.loads(f.read_text())["exit_code_by_key"]


def equivalents() -> dict[str, str]:
    """Mutant name -> the mutated line recorded for it."""
    out = {}
    for line in EQUIVALENTS.read_text().splitlines() if EQUIVALENTS.exists() else []:
        m = _EQUIVALENT.match(line)
        if m:
            out[m["name"]] = m["line"].strip()
    return out


def mutated_line(name: str, path: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    added = [ln[1:].strip() for ln in get_diff_for_mutant(name, path=path).splitlines()
             if ln.startswith("+") and not ln.startswith("+++")]
    return added[0] if added else ""


def mutmut(*names: str, quiet: bool = False) -> None:
    cmd = ["nice", "-n", "10", str(Path(sys.executable).with_name("mutmut")), "run",
           "--max-children", "1", *names]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=False, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL if quiet else None)


def score(path: str, names: list[str]) -> dict[str, object]:
    codes = meta(path)
    eq = equivalents()
    counts = {"killed": 0, "timeout": 0, "survived": 0, "equivalent": 0, "not run": 0}
    survivors, stale = [], []
    for name in names:
        code = codes.get(name)
        if code in KILLED:
            counts["killed"] += 1
        elif code in TIMEOUT:
            counts["timeout"] += 1
        elif code is None:
            counts["not run"] += 1
        elif name in eq and mutated_line(name, path) == eq[name]:
            counts["equivalent"] += 1
        else:
            counts["survived"] += 1
            survivors.append(name)
            if name in eq:
                stale.append(name)
    live = counts["killed"] + counts["timeout"] + counts["survived"]
    pct = 100.0 * (counts["killed"] + counts["timeout"]) / live if live else 100.0
    return {"module": path, "mutants": len(names), **counts, "score": round(pct, 1),
            "survivors": survivors, "stale_equivalents": stale}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", default=MODULES)
    ap.add_argument("--sample", type=int, default=0, help="mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--score-only", action="store_true")
    ap.add_argument("--json", type=Path, help="write the scores here too")
    args = ap.parse_args()
    if not args.score_only and not any(meta(p) for p in args.modules):
        # mutants and the test-to-function stats; the pattern matches no mutant (mutmut says so)
        mutmut("__generate_only__.*", quiet=True)
    results = []
    for path in args.modules:
        names = sorted(meta(path))
        if args.sample and len(names) > args.sample:
            names = sorted(random.Random(f"{args.seed}:{path}").sample(names, args.sample))
        start = time.monotonic()
        if not args.score_only and names:
            mutmut(*names) if args.sample else mutmut(module_name(path) + ".*")
        result = score(path, names)
        result["run_s"] = round(time.monotonic() - start, 1)
        results.append(result)
        print(f"{path}: {result['mutants']} mutants, {result['killed']} killed, "
              f"{result['timeout']} timeouts, {result['survived']} survived, "
              f"{result['equivalent']} equivalent, {result['not run']} not run -> "
              f"{result['score']}% of non-equivalent killed ({result['run_s']} s)", flush=True)
        for name in result["survivors"]:
            print(f"    survived: {name}")
        for name in result["stale_equivalents"]:
            print(f"    stale entry in {EQUIVALENTS}: {name} (its mutated line changed)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
