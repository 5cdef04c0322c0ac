#!/usr/bin/env bash
# Make .venv/ with everything the project needs. Idempotent: a second run with an unchanged
# pyproject.toml finishes in about a second (a stamp records what was installed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.flexi-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/flexi" ]; then
  exit 0
fi
PY="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() {  # quiet unless it fails; drops pip's notes about absent local index folders
  local log; log="$(mktemp)"
  if ! "$venv/bin/pip" install -q "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
  grep -v '^WARNING: Location' "$log" || true
  rm -f "$log"
}
echo "setting up $venv (first run: about 3 minutes)" >&2
# torch first, pinned: an unpinned torch pulled in by another package resolves to a multi-GB CUDA build.
pip_install "torch==2.13.0"
pip_install -e ".[dev]"
echo "$want" > "$stamp"
