"""Shared helpers of the dflow_fast benchmarks (docs/design.md section 6), one topic a module;
every public name is re-exported here, so ``from bench.lib import X`` (or ``from bench import lib
as L``) is all a script needs.

- :mod:`bench.lib.env`: ``REPO_ROOT``, ``RESULTS_DIR``; :func:`environment` (device,
  torch/python versions, git commit, CPU and thread counts), :func:`git_commit`,
  :func:`write_json` (results plus that metadata), :func:`command` (the ``python -m bench.X ...``
  line recorded with results), :func:`shown` (a path relative to the repository root).
- :mod:`bench.lib.nets`: :class:`ConvVelocityNet`, a U-Net-style conv velocity built here so the
  benchmarks need no trained checkpoint, in the sizes of :data:`CONFIGS` ("tiny" for tests,
  "small" for CPU runs, "gpu" 35M parameters at 3x64x64 for CUDA runs); :func:`build_velocity`
  (a frozen one), :func:`n_params`, :data:`DEFAULT_NET` and the shared options
  :func:`add_net_options` / :func:`check_net_options`.
- :mod:`bench.lib.methods`: :func:`one_gradient`, d cost(x1)/d x0 by any compared method, through
  :func:`solve_by`, which also runs the peers (torch.utils.checkpoint, torchdiffeq,
  flow_matching) and a one-network-VJP baseline; :func:`available_methods` lists what runs here,
  :func:`peer_available` why a peer does not; :func:`mse_cost`, :class:`CountingVelocity`,
  :func:`one_eval`, :func:`rel_err`.
- :mod:`bench.lib.memory`: :class:`SavedBytesMeter` / :func:`saved_bytes_gradient` and
  :class:`RssPeak` (CPU memory), :func:`cuda_peak` (CUDA); :func:`guard_oom`: run a measurement
  and return ``"oom"`` instead of raising (:func:`is_oom`).
- :mod:`bench.lib.timing`: :func:`time_cpu` / :func:`time_cuda`, wall times of repeats after
  warm-up; :func:`time_interleaved`, the same for several functions round-robin; :func:`median`.

The scripts run as modules from the repository root (``python -m bench.bench_gradient``): the
current directory on ``sys.path`` makes ``bench`` and the checkout's ``dflow_fast`` importable.
"""
from .env import (REPO_ROOT, RESULTS_DIR, command, environment, git_commit, shown,
                  write_json, write_result)
from .memory import (MIB, RssPeak, SavedBytesMeter, cuda_peak, guard_oom, is_oom,
                     saved_bytes_gradient)
from .methods import (BASELINE_METHODS, DFLOW_EXTRA_METHODS, METHODS, PEER_METHODS,
                      CountingVelocity, available_methods, import_peers, mse_cost, one_eval,
                      one_gradient, peer_available, rel_err, solve_by)
from .nets import (CONFIGS, DEFAULT_NET, ConvVelocityNet, NetConfig, add_net_options,
                   build_velocity, check_net_options, n_params)
from .timing import median, time_cpu, time_cuda, time_interleaved

__all__ = [
    # env
    "REPO_ROOT", "RESULTS_DIR", "command", "environment", "git_commit", "shown", "write_json", "write_result",
    # nets
    "CONFIGS", "DEFAULT_NET", "ConvVelocityNet", "NetConfig", "add_net_options",
    "build_velocity", "check_net_options", "n_params",
    # methods
    "BASELINE_METHODS", "DFLOW_EXTRA_METHODS", "METHODS", "PEER_METHODS", "CountingVelocity",
    "available_methods", "import_peers", "mse_cost", "one_eval", "one_gradient",
    "peer_available", "rel_err", "solve_by",
    # memory
    "MIB", "RssPeak", "SavedBytesMeter", "cuda_peak", "guard_oom", "is_oom",
    "saved_bytes_gradient",
    # timing
    "median", "time_cpu", "time_cuda", "time_interleaved",
]
