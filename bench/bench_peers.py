"""The gradient benchmark against the peers: one run compares, for one gradient d cost(x1)/d x0
through a midpoint solve of the U-Net velocity, dflow_fast.reference, dflow_fast's backprop and its
adjoint on every backend of the device, torch.utils.checkpoint per step, torchdiffeq (odeint;
odeint_adjoint on the grid and with step_size) and flow_matching's ODESolver, for steps 5 10 20 40
and batch 1 8 32. Any option of ``python -m bench.bench_gradient`` may follow and overrides these
presets.

    python -m bench.bench_peers                                      # CPU, ~30 min on 2 cores
    python -m bench.bench_peers --device cuda --config gpu           # CUDA, 35M-param 64x64 U-Net

Writes ``bench/results/peers_<device>[_<config>].{json,md}`` and ``_memory.png``, ``_rss.png``
(CPU), ``_time.png``, ``_throughput.png``. Peers that are not installed are left out (listed by
``pip install -e ".[bench]"``).
"""
from __future__ import annotations

import sys

from bench import bench_gradient

MODULE = "bench.bench_peers"
PRESET = ["--methods", "all", "--batch", "1", "8", "32", "--steps", "5", "10", "20", "40",
          "--plot"]


def main(argv=None) -> int:
    """``bench_gradient.main`` with :data:`PRESET` parsed before ``argv`` (default: the command
    line), which overrides it."""
    return bench_gradient.main(argv, preset=PRESET, module=MODULE,
                               description=__doc__.split("\n\n")[0], out_stem="peers")


if __name__ == "__main__":
    sys.exit(main())
