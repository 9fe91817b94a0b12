"""Side-by-side speed measurements (SPEC §9), printed as a Markdown table with ratios:

    python launch/bench.py

Both sides of every comparison get the same protocol: one warm-up pass each, then the same number
of timed passes each, interleaved; each side's median images/s and its slowest-fastest spread are
printed, and the ratio is that of the medians (coupled_net.bench.compare)."""

from coupled_net.bench import measure_all

if __name__ == "__main__":
    print(measure_all())
