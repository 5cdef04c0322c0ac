#!/usr/bin/env bash
# The GPU check: run it when a session is lent a GPU (never part of CI). On one GPU, within
# GPU_CHECK_BUDGET_S seconds (default 470, under 8 minutes, setup included), it measures
#   - bf16 DeepSpeed ZeRO-2 and ZeRO-3 training steps (s/step, tokens/s) of a LLaMA-3.2-1B-shaped model with
#     random weights and mixed Flexi ranks through Ray Train (bench/gpu_check.py: the project's worker loop),
#   - each run's peak GPU memory (torch.cuda.max_memory_allocated in the worker) against `flexi plan`'s estimate,
#   - Ray Data generation with the trained adapter on a GPU actor (evaluation.gpus_per_actor: 1),
#   - bench/adapter.py --device cuda --dtype bfloat16 at LLaMA-3.2-1B's width,
#   - with the time left, bench/zero_memory.py: each phase's GPU memory under ZeRO-2 and ZeRO-3,
# and prints ONE JSON line at the end (logs stay in the folder it names). A part that runs out of time or fails
# is recorded as such; the others' figures still come back.
#
#   bash bench/gpu_check.sh             # on the GPU machine: makes .venv with a CUDA torch first
#   bash bench/gpu_check.sh --dry-run   # anywhere: every part tiny on CPU with an existing venv
#                                       # (FLEXI_PYTHON, default .venv/bin/python), nothing installed
#
#   FLEXI_PYTHON=python3 bash bench/gpu_check.sh   # on a GPU machine whose python3 already has the packages
#                                       # (e.g. an image's CUDA torch plus the rest on PYTHONPATH): no setup
#
# Setup: scripts/setup.sh with FLEXI_TORCH=cuda (torch from the package index, not a local CPU wheel);
# FLEXI_TORCH_VERSION / FLEXI_TORCH_PIP_ARGS pick another torch build for that install, e.g. one for an older
# driver's CUDA (the JSON's driver_cuda says which the driver runs).
# A second run reuses .venv (the setup stamp) and so has nearly the whole budget for the checks.
set -uo pipefail
{  # read whole before it runs: editing or checking out the file mid-run cannot change what runs
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (--dry-run, --help)" >&2; exit 2 ;;
  esac
done
budget="${GPU_CHECK_BUDGET_S:-470}"
start=$SECONDS
logs="${GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu-check.XXXXXX)}"
mkdir -p "$logs"
left() { echo $(( budget - (SECONDS - start) )); }
limit() { local l; l=$(left); l=$(( l - ${2:-0} )); [ "$l" -gt "$1" ] && l=$1; echo "$l"; }  # min(cap, left - reserve)

setup_rc=0
if [ "$dry" = 1 ]; then
  py="${FLEXI_PYTHON:-$root/.venv/bin/python}"
  train_args=(--cpu)
  zero_args=(--cpu)
  adapter_args=(--device cpu --dtype bfloat16 --quick --hidden 64 --layers 1 --vocab 512 --seq 32 --batch 2
                --prompt 8 --new-tokens 4 --repeats 1)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$logs/nvidia-smi.txt" 2>&1 \
    || echo "nvidia-smi failed" >>"$logs/nvidia-smi.txt"
  nvidia-smi >>"$logs/nvidia-smi.txt" 2>&1 || true  # the header names the highest CUDA version the driver runs
  if [ -n "${FLEXI_PYTHON:-}" ]; then  # an interpreter that already has the project's packages: no setup
    py="$(command -v "$FLEXI_PYTHON" || echo "$FLEXI_PYTHON")"
    "$py" -c "import torch, ray, deepspeed, transformers, peft; print('python', torch.__version__, ray.__version__, deepspeed.__version__, transformers.__version__, peft.__version__)" >"$logs/setup.log" 2>&1
    setup_rc=$?
  else
    FLEXI_TORCH=cuda timeout -k 10 "$(limit 360 60)" bash scripts/setup.sh >"$logs/setup.log" 2>&1
    setup_rc=$?
    py="$root/.venv/bin/python"
  fi
  train_args=()
  zero_args=()
  # LLaMA-3.2-1B's width and vocabulary, 8 layers: the adapter bench builds its model on CPU in fp32
  adapter_args=(--device cuda --dtype bfloat16 --quick --hidden 2048 --layers 8 --vocab 128256 --seq 512 --batch 8
                --prompt 128 --new-tokens 64)
fi
setup_s=$(( SECONDS - start ))

train_rc=skipped
adapter_rc=skipped
if [ "$setup_rc" = 0 ] && [ -x "$py" ]; then
  t=$(limit 330 75)  # keeps ~75 s for the adapter bench and the summary
  if [ "$t" -gt 30 ]; then
    RAY_USAGE_STATS_ENABLED=0 timeout -k 15 "$t" "$py" bench/gpu_check.py "${train_args[@]}" \
      --out "$logs/train.json" --work "$logs/work" >"$logs/train.log" 2>&1
    train_rc=$?
  fi
  t=$(limit 150 10)
  if [ "$t" -gt 20 ]; then
    timeout -k 10 "$t" "$py" bench/adapter.py "${adapter_args[@]}" >"$logs/adapter.log" 2>&1
    adapter_rc=$?
  fi
  # with what time is left: each phase's GPU memory under ZeRO-2 and ZeRO-3 (bench/zero_memory.py), on the
  # model the training part built, so a gap between a peak and the plan can be traced
  for stage in 2 3; do
    t=$(limit 90 5)
    if [ "$t" -gt 30 ] && [ -f "$logs/work/llama-random/config.json" ]; then
      timeout -k 10 "$t" "$py" bench/zero_memory.py --stage "$stage" "${zero_args[@]}" \
        --model "$logs/work/llama-random" >>"$logs/zero_memory.log" 2>&1
      zero_rc="${zero_rc:-}${zero_rc:+,}$stage:$?"
    fi
  done
fi
rm -rf "$logs/work"

# the one JSON line (stdlib Python: it works even when the venv could not be made)
python3 - "$logs" "$dry" "$setup_rc" "$setup_s" "$train_rc" "$adapter_rc" "$(( SECONDS - start ))" "$budget" \
  "${zero_rc:-skipped}" <<'EOF'
import json, sys
from pathlib import Path

logs, dry, setup_rc, setup_s, train_rc, adapter_rc, wall, budget, zero_rc = sys.argv[1:]
logs = Path(logs)

def status(rc):
    return {"0": "ok", "124": "timed out", "137": "timed out", "skipped": "skipped (out of time or no setup)"}.get(rc, f"failed (exit {rc})")

def last_json(path):
    try:
        lines = [l for l in path.read_text().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None

def tail(path, n=5):
    try:
        return path.read_text().splitlines()[-n:]
    except OSError:
        return None

train = last_json(logs / "train.json") or {}
adapter = last_json(logs / "adapter.log")
out = {
    "gpu_check": "dry-run (CPU, tiny model)" if dry == "1" else "gpu",
    "driver_cuda": next((l.split("CUDA Version:")[1].split()[0] for l in (tail(logs / "nvidia-smi.txt", 40) or [])
                         if "CUDA Version:" in l), None),
    "gpu": train.get("gpu") or ((logs / "nvidia-smi.txt").read_text().splitlines()[0] if (logs / "nvidia-smi.txt").exists() else None),
    "torch": train.get("torch"), "torch_cuda": train.get("torch_cuda"),
    "setup": {"status": status(setup_rc), "seconds": int(setup_s)},
    "model": train.get("model"),
    "zero2": train.get("zero2"), "zero3": train.get("zero3"), "generation": train.get("generation"),
    "adapter": None if adapter is None else {k: adapter.get(k) for k in (
        "train_step_ratio_vs_peft", "generate_ratio_vs_peft", "train_step_ratio_rmax_vs_peft",
        "generate_ratio_rmax_vs_peft", "merged_generate_ratio_vs_base", "merged_uniform_generate_ratio_vs_base",
        "merged_cold_generate_ratio_vs_base", "merged_sorted_generate_ratio_vs_base", "base_again_ratio_vs_base",
        "paired_ratio_vs_base",
        "merged_tokens_equal_unmerged", "merged_agreement", "train_step_s", "generate_s", "device", "dtype", "wall_s")},
    "zero_memory": [json.loads(l) for l in ((logs / "zero_memory.log").read_text().splitlines()
                                            if (logs / "zero_memory.log").exists() else []) if l.startswith('{"stage"')],
    "status": {"train_and_generation": status(train_rc), "adapter": status(adapter_rc), "zero_memory": zero_rc},
    "errors": train.get("errors") or {},
    "wall_s": int(wall), "budget_s": int(budget), "logs": str(logs),
}
if setup_rc != "0":
    out["errors"]["setup"] = tail(logs / "setup.log")
if train_rc not in ("0", "skipped") and not train.get("errors"):
    out["errors"]["train_and_generation"] = tail(logs / "train.log")
if adapter_rc not in ("0", "skipped"):
    out["errors"]["adapter"] = tail(logs / "adapter.log")
print(json.dumps(out))
EOF
exit
}
