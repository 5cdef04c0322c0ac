"""Entry point for `ray job submit`: a recipe's pipeline, or its sweep, on the cluster the job runs in.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run.py RECIPE [key.sub=value ...]          # flexi run
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run.py sweep RECIPE [key.sub=value ...]    # flexi sweep

(on this machine: `bash scripts/local-cluster.sh submit [sweep] RECIPE`, README "Running on a cluster")

The first argument may name the command (run, sweep, report, score, route, train, eval); without
one it is `run`. Under `ray job submit`, RAY_ADDRESS is set, so the work joins that cluster instead
of starting its own; the cluster's Python must have flexi-workflows installed (`pip install -e .`
there). The working directory is uploaded without what .gitignore lists (.venv, outputs).
"""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_NEEDED = ("torch", "ray", "transformers", "deepspeed", "mlflow")
_missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
if _missing:  # the cluster's Python is not the project's: say so before anything else fails
    sys.exit(
        f"jobs/run.py: this Python ({sys.executable}) lacks {', '.join(_missing)} — the job runs in the Python "
        f"of the process that started the Ray head. Start the head from the project's environment "
        f"(bash scripts/local-cluster.sh start, or `source .venv/bin/activate` before `ray start`), or install "
        f"the project on every node (bash scripts/setup.sh; cluster/README.md)."
    )

from flexi_workflows.cli import main  # noqa: E402

COMMANDS = {"run", "sweep", "report", "score", "route", "train", "eval"}

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in COMMANDS:
        args = ["run", *args]
    sys.exit(main(args))
