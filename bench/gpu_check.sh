#!/usr/bin/env bash
# The prepared GPU check (make gpu-check OUT=…): bench/gpu_check.sh OUT_DIR [--dry-run] [--no-install] [--parts …]
# The logic is in bench/gpu_check.py, which needs only the standard library: it runs before .venv exists.
set -euo pipefail
exec python3 "$(dirname "$0")/gpu_check.py" "$@"
