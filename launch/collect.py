"""Merge every run below the given directories into one review: tables and plots.

    python launch/collect.py outputs/multirun/2026-11-25/10-00-00 [more dirs] [--out DIR] [--baseline KEY=VALUE]
    python launch/collect.py DIR [more dirs] --status

Writes summary.csv, summary_groups.csv, summary_delta.csv, summary.md, summary.tex,
summary_*.png and summary.html (all of them in one self-contained page) into --out (default: the first directory) and prints the headline table. --status
writes nothing: it prints how far each directory's runs are and an ETA (coupled_net.status)."""

import argparse
import logging
import os
import sys

from coupled_net.errors import ConfigError, one_line
from coupled_net.status import status
from coupled_net.storage import disk_full


def baseline(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as YAML (0 is a number, copy a string)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. coupling.alpha=0")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="sweep directories, run directories, or folders holding them")
    parser.add_argument("--out", help="where to write the summary files (default: the first directory)")
    parser.add_argument("--baseline", type=baseline, action="append", metavar="KEY=VALUE",
                        help="the runs each group is compared with, by seed (default: coupling.alpha=0; repeatable)")
    parser.add_argument("--status", action="store_true",
                        help="print each directory's counts per status, its running/stale/failed runs and an ETA; "
                             "writes nothing")
    args = parser.parse_args()
    if args.status and (args.out or args.baseline):
        parser.error("--status takes no --out or --baseline: it writes nothing and compares nothing")
    logging.basicConfig(level=logging.WARNING, format="collect: %(levelname)s: %(message)s")
    if args.status:
        show_status(args.dirs)
        return
    # start-up: --status must answer in under a second, and the review imports pandas, scipy and matplotlib
    from coupled_net.report import write_summary

    try:
        summary = write_summary(args.dirs, args.out, dict(args.baseline) if args.baseline else None)
    except (FileNotFoundError, ConfigError) as e:
        print(f"collect: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:  # a full disk, an unwritable --out: one line, not a traceback
        print(f"collect: error: {disk_full(e, args.out or args.dirs[0]) or one_line(e)}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("collect: interrupted", file=sys.stderr)
        raise SystemExit(130)
    print(summary.headline)


def show_status(dirs: list[str]) -> None:
    try:
        print(status(dirs), flush=True)
    except BrokenPipeError:  # `--status | head`: the reader has what it wanted; no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except FileNotFoundError as e:
        print(f"collect: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("collect: interrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
