"""Summarise a ``py-spy record --format raw`` file: where the samples are, by function.

``python bench/pyspy_top.py FILE [-n 25]`` prints the functions with the most samples on top of
the stack (self) and the most samples anywhere on the stack (total, each function counted
once per sample), as percentages of all samples. The scale scenario writes such files with
``bench/run.py --scenario scale --profile``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

__all__ = ["main", "summarise"]

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LINENO = re.compile(r":\d+\)$")


def _function(frame: str) -> str:
    """``name (file.py:123)`` -> ``name (file.py)``: one entry per function, not per line."""
    return _LINENO.sub(")", frame.strip())


def summarise(text: str, top: int = 25) -> str:
    """The self and total tables of a raw py-spy profile, as text."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        count = int(match["count"])
        frames = [_function(f) for f in match["stack"].split(";") if f.strip()]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    if not samples:
        return "no samples"
    out = [f"{samples} samples", "", "self %  function"]
    out += [f"{100 * n / samples:6.1f}  {name}" for name, n in own.most_common(top)]
    out += ["", "total %  function"]
    out += [f"{100 * n / samples:6.1f}  {name}" for name, n in total.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("-n", type=int, default=25, help="rows per table")
    args = ap.parse_args(argv)
    print(summarise(args.file.read_text(errors="replace"), args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
