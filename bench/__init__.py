"""dflow_fast's benchmarks: scripts run as modules from the repository root
(``python -m bench.bench_gradient``), their shared helpers in :mod:`bench.lib`, and the pytest
suites ``test_bench_smoke.py`` and ``test_bench_suite.py``. Results: ``bench/results/``."""
