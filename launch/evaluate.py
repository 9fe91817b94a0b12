"""Re-evaluate a run's checkpoints/best.pt on val and/or test, before and after KE:

    python launch/evaluate.py outputs/runs/2026-11-25/10-00-00 [--split val|test|both]

Prints the metrics and writes evaluation.json into the run directory."""

import argparse
import sys

from coupled_net.errors import ConfigError, DatasetUnavailable
from coupled_net.evaluate import SPLITS, evaluate_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--split", choices=sorted(SPLITS), default="both")
    args = parser.parse_args()
    try:
        out = evaluate_run(args.run_dir, args.split)
    except (FileNotFoundError, ConfigError, DatasetUnavailable) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"{out['checkpoint']} (alpha={out['alpha']})")
    print(f"{'split':6} {'':10} {'top-1':>8} {'top-5':>8} {'loss':>9}")
    for split, both in out["splits"].items():
        for when, m in both.items():
            print(f"{split:6} {when:10} {m['top1']:8.2f} {m['top5']:8.2f} {m['loss']:9.4f}")


if __name__ == "__main__":
    main()
