#!/usr/bin/env bash
# Set up .venv (idempotent) and run the project's main job: the CPU quickstart pipeline
# (jobs/quickstart.yaml). Extra arguments are recipe overrides, e.g. router.noise_std=0.3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
exec .venv/bin/flexi run jobs/quickstart.yaml "$@"
