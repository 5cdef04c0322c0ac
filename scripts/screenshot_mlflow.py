"""Screenshot MLflow's compare view of a sweep's trials in a real browser (headless Chromium).

    .venv/bin/python scripts/screenshot_mlflow.py outputs/sweep-quickstart docs/images/mlflow-sweep-compare.png

Starts `mlflow ui` on 127.0.0.1 over the sweep's tracking store (its sqlite file), finds the sweep's
parent run and its trial runs, opens the compare-runs page for them and saves the picture. Needs
`chromium` (Debian: `apt-get install -y chromium`).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(sweep_dir: str, out: str, view: str = "compare") -> int:
    sweep_dir = Path(sweep_dir).resolve()
    state = json.loads((sweep_dir / "sweep.json").read_text())
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{sweep_dir / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**__import__("os").environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(url)
        parent = client.get_run(state["parent_run_id"])
        experiment = parent.info.experiment_id
        trials = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                                                 f"and tags.`flexi.kind` = 'trial'")
        ids = [r.info.run_id for r in trials]
        if view == "compare":
            query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment])})
            page = f"{url}/#/compare-runs?{query}"
        else:
            page = f"{url}/#/experiments/{experiment}/runs"
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1600,1200", "--virtual-time-budget=20000", f"--screenshot={Path(out).resolve()}",
                        page], check=True, capture_output=True, timeout=180)
        print(f"{len(ids)} trial runs → {out}\n{page}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
