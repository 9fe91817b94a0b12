"""Side-by-side speed measurements (SPEC §9), printed as Markdown tables with ratios:

    python launch/bench.py                                  # every section; seed size on CUDA
    python launch/bench.py --only quickstart,steps --repeats 2
    python launch/bench.py --size seed --only seed trainer.precision=bf16 trainer.channels_last=true
    python launch/bench.py --sync-check                     # CUDA: no host sync inside a training step

Both sides of every comparison get the same protocol: one warm-up pass each, then the same number
of timed passes each, interleaved; each side's median images/s and its slowest-fastest spread are
printed, and the ratio is that of the medians (coupled_net.bench.compare). The trainer sections time
runs built by coupled_net.build through their own Trainer, with deterministic on and off side by side,
each pass under its side's flags. `--help` lists the options."""

from coupled_net.bench import main
from coupled_net.errors import interrupted

if __name__ == "__main__":
    with interrupted():
        raise SystemExit(main())
