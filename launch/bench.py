"""Side-by-side speed measurements (SPEC §9), printed as a Markdown table with ratios:

    python launch/bench.py
"""

from coupled_net.bench import run

if __name__ == "__main__":
    print(run())
