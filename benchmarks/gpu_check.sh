#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py's docstring says what it runs and what to carry): installs
# the wheels carried in .whl/ (fvcore and its needs; mamba-ssm and causal-conv1d if built) into /tmp/site with no
# network, then runs the check. Arguments pass through, e.g. --dry-run or --sections scan,throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
