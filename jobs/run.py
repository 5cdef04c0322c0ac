"""Entry point for `ray job submit`: a recipe's pipeline, or its sweep, on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/run.py jobs/quickstart.yaml [key.sub=value ...]          # flexi run
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/run.py sweep jobs/sweep-quickstart.yaml [key.sub=value ...]   # flexi sweep

The first argument may name the command (run, sweep, report, score, route, train, eval); without
one it is `run`. Under `ray job submit`, RAY_ADDRESS is set, so the work joins that cluster instead
of starting its own; the cluster's Python must have flexi-workflows installed (`pip install -e .`
there). The working directory is uploaded without what .gitignore lists (.venv, outputs).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexi_workflows.cli import main  # noqa: E402

COMMANDS = {"run", "sweep", "report", "score", "route", "train", "eval"}

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in COMMANDS:
        args = ["run", *args]
    sys.exit(main(args))
