"""Merge every run below the given directories into one table and plots:

    python launch/collect.py outputs/multirun/2026-11-25/10-00-00 [more dirs] [--out DIR]

Writes summary.csv, summary.md, summary.tex and summary_*.png into --out (default: the first
directory) and prints the Markdown table."""

import argparse
import logging
import sys

from coupled_net.collect import write_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="sweep directories, run directories, or folders holding them")
    parser.add_argument("--out", help="where to write the summary files (default: the first directory)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="collect: %(levelname)s: %(message)s")
    try:
        _, md = write_summary(args.dirs, args.out)
    except FileNotFoundError as e:
        print(f"collect: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(md)


if __name__ == "__main__":
    main()
