"""Re-evaluate a trained run's checkpoint on its val and/or test split:

    python launch/evaluate.py RUN_DIR [--checkpoint best|last|PATH] [--split val|test|both]
                              [--device auto|cpu|cuda|cuda:N] [--limit-batches N] [--callbacks NAME,...]

Builds the model and data from the run's .hydra/config.yaml, loads the checkpoint (refused when it
is of another run or does not fit the model), evaluates whole splits (the run's own
trainer.limit_batches is ignored), prints the metrics and writes evaluation.json into RUN_DIR.
--callbacks re_model (conf/callbacks/NAME.yaml, or a YAML file) runs training-loop callbacks'
on_fit_end on the best, equalized model and adds their results to a finished run's results.json:
a probe added to a sweep after its runs ended."""

import sys

try:  # importing torch takes seconds: Ctrl-C meanwhile ends with one line too
    import argparse
    import os

    from coupled_net.errors import ConfigError, DatasetUnavailable, RunFault, one_line
    from coupled_net.reevaluate import SPLITS, describe, evaluate_run, table
except KeyboardInterrupt:
    print("\nevaluate: error: interrupted (SIGINT) while starting; nothing was evaluated", file=sys.stderr)
    raise SystemExit(130) from None

USAGE = ("evaluate.py RUN_DIR [--checkpoint best|last|PATH] [--split val|test|both] "
         "[--device auto|cpu|cuda|cuda:N] [--limit-batches N] [--callbacks NAME,...]")


def fail(message: str, code: int = 2):
    print(f"evaluate: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other error of this command
        fail(f"{message} (usage: {USAGE})")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="evaluate.py", usage=USAGE, description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory (it holds .hydra/config.yaml and checkpoints/)")
    p.add_argument("--checkpoint", default="best", metavar="best|last|PATH",
                   help="best: checkpoints/best.pt (the best epoch, equalized; default); last: checkpoints/last.pt "
                        "(the latest epoch); PATH: any .pt file holding a state_dict or a last.pt-style dict")
    p.add_argument("--split", choices=list(SPLITS), default="both")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="auto (default): the GPU if there is one, else the CPU")
    p.add_argument("--limit-batches", type=positive_int, default=None, metavar="N",
                   help="evaluate only the first N batches of each split (default: whole splits)")
    p.add_argument("--callbacks", type=lambda text: [n for n in text.split(",") if n], default=[],
                   metavar="NAME,...", help="training-loop callbacks whose on_fit_end to run on the best model and "
                                            "add to results.json (conf/callbacks/NAME.yaml, or a YAML file)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        out = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint, device=args.device,
                           limit_batches=args.limit_batches, progress=os.isatty(2), callbacks=args.callbacks)
    except KeyboardInterrupt:
        print("\nevaluate: error: interrupted (SIGINT); evaluation.json was not written", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (ConfigError, DatasetUnavailable, RunFault) as e:  # RunFault: a callback that raised
        fail(str(e))
    except OSError as e:  # unreadable run directory, evaluation.json not writable, ...
        fail(one_line(e, 300))
    print("\n".join(describe(out) + [""] + table(out)))
    for name, values in (out.get("callbacks") or {}).items():
        print(f"callbacks.{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in values.items()))
    print(f"wrote {out['run_dir']}/evaluation.json")


if __name__ == "__main__":
    main()
