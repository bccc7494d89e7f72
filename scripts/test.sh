#!/usr/bin/env bash
# The test command: set up (scripts/setup_env.sh), then run the test suite and the benchmark smoke
# suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider --benchmark-disable "$@"  # testpaths: tests, bench
