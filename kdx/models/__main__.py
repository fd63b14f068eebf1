"""`python -m kdx.models [PATTERN ...] [--source kdx|torchvision|timm|all]`: the model names build_model accepts."""
from __future__ import annotations

import argparse
import difflib
import fnmatch
import os
import sys

from kdx.models import list_models

SOURCES = ("kdx", "torchvision", "timm", "all")


def matches(name: str, pattern: str) -> bool:
    """True when `name` fits `pattern`: a glob (resnet*, *mobilenet*) or else a substring, case-insensitive."""
    name, pattern = name.lower(), pattern.lower()
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.split(":", 1)[-1], pattern)
    return pattern in name


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m kdx.models`."""
    parser = argparse.ArgumentParser(
        prog="python -m kdx.models",
        description="List the model names that kdx accepts as teacher.name / student.name (build_model): kdx's own "
                    "nets, then torchvision's (tv: prefix) and timm's (timm: prefix).",
        epilog="examples:  python -m kdx.models                 # kdx's own nets\n"
               "           python -m kdx.models resnet          # names containing 'resnet', from every source\n"
               "           python -m kdx.models 'mobilenet*' --source timm\n"
               "           python -m kdx.models --source torchvision",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patterns", nargs="*", metavar="PATTERN",
                        help="keep names containing PATTERN, or matching it as a glob (*, ?); several: any of them. "
                             "kdx, torchvision, timm or all alone select a source (as --source does)")
    parser.add_argument("--source", choices=SOURCES, default=None,
                        help="which registry to list (default: kdx without a pattern, all with one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """List the names; exit 1 with close matches when a pattern matches nothing."""
    args = build_parser().parse_args(argv)
    patterns = list(args.patterns)
    source = args.source
    if source is None and len(patterns) == 1 and patterns[0] in SOURCES:  # `python -m kdx.models timm`
        source, patterns = patterns[0], []
    source = source or ("all" if patterns else "kdx")
    names = list_models(source)
    shown = [n for n in names if any(matches(n, p) for p in patterns)] if patterns else names
    if not shown:
        bare = list(dict.fromkeys(n.split(":", 1)[-1] for n in names))
        close = difflib.get_close_matches(patterns[0].lower().strip("*?"), bare, n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else "; run `python -m kdx.models --help` for patterns"
        where = "kdx, torchvision or timm" if source == "all" else source
        print(f"no {where} model name matches {' or '.join(repr(p) for p in patterns)}{hint}", file=sys.stderr)
        return 1
    try:
        print("\n".join(shown), flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if patterns or source != "kdx":
        print(f"({len(shown)} of {len(names)} {source} names)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
