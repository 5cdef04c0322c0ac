#!/usr/bin/env bash
# Set up .venv (idempotent) and run the project's main job. Extra arguments go to the job.
# Until the score → route → train → evaluate pipeline lands, the main job is the adapter benchmark
# (Flexi-LoRA against PEFT LoRA, bench/adapter.py --quick).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python bench/adapter.py --quick "$@"
