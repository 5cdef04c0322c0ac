"""Entry point for `ray job submit`: run a recipe's pipeline on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/run.py jobs/quickstart.yaml [key.sub=value ...]

Under `ray job submit`, RAY_ADDRESS is set, so the pipeline joins that cluster instead of starting
its own; the cluster's Python must have flexi-workflows installed (`pip install -e .` there). The
working directory is uploaded without what .gitignore lists (.venv, outputs).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexi_workflows.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
