"""The ``fused-ft`` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-ft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="the main job on a built-in default (what `make demo` runs)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fused_ft import demo

        demo.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
