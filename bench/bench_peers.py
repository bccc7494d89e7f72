"""The gradient benchmark against the peers: one run compares, for one gradient d cost(x1)/d x0
through a midpoint solve of the U-Net velocity, dflow_fast.reference, dflow_fast's backprop and its
adjoint on every backend of the device, torch.utils.checkpoint per step, torchdiffeq (odeint;
odeint_adjoint on the grid and with step_size) and flow_matching's ODESolver, for steps 5 10 20 40
and batch 1 8 32. Any option of bench/bench_gradient.py may follow and overrides these presets.

    python bench/bench_peers.py                                      # CPU, ~30 min on 2 cores
    python bench/bench_peers.py --device cuda --config gpu           # CUDA, 35M-param 64x64 U-Net

Writes ``bench/results/peers_<device>[_<config>].{json,md}`` and ``_memory.png``, ``_rss.png``
(CPU), ``_time.png``, ``_throughput.png``. Peers that are not installed are left out (listed by
``pip install -e ".[bench]"``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, bench package
from bench import bench_gradient  # noqa: E402

PRESET = ["--methods", "all", "--batch", "1", "8", "32", "--steps", "5", "10", "20", "40",
          "--plot"]

if __name__ == "__main__":
    sys.exit(bench_gradient.main(PRESET + sys.argv[1:], prog="bench_peers.py",
                                 description=__doc__.split("\n\n")[0], out_stem="peers"))
