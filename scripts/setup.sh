#!/usr/bin/env bash
# Make .venv/ with everything the project needs. Idempotent: a second run with an unchanged
# pyproject.toml finishes in about a second (a stamp records what was installed).
#
# Which torch: FLEXI_TORCH=cpu (the default) installs torch==2.13.0 as pip's configuration resolves it —
# on the project's machines a CPU wheel kept on local disk. FLEXI_TORCH=cuda (a GPU machine, e.g.
# bench/gpu_check.sh) installs the same version from the package index with the machine's pip
# configuration files left out, so a local CPU wheel cannot win: the index's Linux torch wheels are CUDA
# builds (torch 2.13.0's: CUDA 13, which needs a recent driver). FLEXI_TORCH_VERSION picks another torch
# release and FLEXI_TORCH_PIP_ARGS adds pip arguments to that install (e.g. an index of builds for an older
# CUDA). cuda mode checks the result and stops if torch has no CUDA.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.flexi-installed"
torch_kind="${FLEXI_TORCH:-cpu}"
case "$torch_kind" in cpu|cuda) ;; *) echo "FLEXI_TORCH must be cpu or cuda, got '$torch_kind'" >&2; exit 2;; esac
want="$( (cat pyproject.toml scripts/setup.sh; echo "$torch_kind ${FLEXI_TORCH_VERSION:-} ${FLEXI_TORCH_PIP_ARGS:-}") | sha256sum | cut -d' ' -f1)"
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
if [ "$torch_kind" = cuda ]; then
  if "$venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)' 2>/dev/null; then
    "$venv/bin/pip" uninstall -q -y torch  # a CPU build from an earlier run: "already satisfied" would keep it
  fi
  # shellcheck disable=SC2086  # FLEXI_TORCH_PIP_ARGS is a list of words
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_NO_INDEX -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    "$venv/bin/pip" install -q "torch==${FLEXI_TORCH_VERSION:-2.13.0}" ${FLEXI_TORCH_PIP_ARGS:-}
  "$venv/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' || {
    echo "setup: FLEXI_TORCH=cuda installed a torch without CUDA; pass an index of CUDA wheels in FLEXI_TORCH_PIP_ARGS" >&2
    exit 1; }
else
  pip_install "torch==2.13.0"
fi
pip_install -e ".[dev]"
echo "$want" > "$stamp"
