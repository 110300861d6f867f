"""Screenshots of the Prefect and MLflow UIs for docs/images/, made with headless Chromium from the real servers.

A script run by hand, not a test (pytest does not collect it). It needs Debian's Chromium at /usr/bin/chromium
(`apt-get install -y chromium`); from the repository root:

    .venv/bin/python tests/ui_screenshots.py

In a fresh temporary directory it starts `prefect server start`, runs the tiny pipeline against it (1 to 2 minutes
on 2 cores), starts `mlflow ui` on the pipeline's store, finds the runs through both REST APIs and writes
docs/images/prefect-flow-run-artifacts.png, prefect-artifacts.png, mlflow-runs-table.png and mlflow-model-version.png.
The servers are stopped by PID, also when something fails.

Chromium is driven over the DevTools protocol rather than with `--screenshot`: each page is captured once its content
is on screen, and the MLflow UI gets its view settings first (in its localStorage: the runs table's metric columns and
the Assistant panel closed, which otherwise opens itself on a first visit from 127.0.0.1).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from servers import api, free_port, stop, wait_healthy
from websockets.sync.client import connect  # a dependency of Prefect

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's prefect and mlflow
CHROMIUM = "/usr/bin/chromium"
IMAGES = REPO / "docs" / "images"
WIDTH, HEIGHT = 1600, 1000
METRICS = ("loss", "lr", "tokens_per_s", "cobsat.2shot.mean", "cobsat.4shot.mean")  # the runs table's columns


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=log.parent, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      "--no-first-run", f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = profile / "DevToolsActivePort"  # Chromium writes the port it chose
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("Chromium did not start")
                time.sleep(0.2)
            port = port_file.read_text().split()[0]
            (page,) = [t for t in api(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page"]
            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        except BaseException:
            stop(self.proc)
            raise
        self.ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        request_id = next(self.ids)
        self.ws.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while (message := json.loads(self.ws.recv(timeout=60))).get("id") != request_id:
            pass  # an event
        if "error" in message:
            raise RuntimeError(f"{method}: {message['error']}")
        return message["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def set_storage(self, origin: str, items: dict[str, object]) -> None:
        """Put `items` (as JSON) into the localStorage of `origin`, through a page of it."""
        self.call("Page.navigate", url=f"{origin}/health")
        time.sleep(1)
        self.js(f"for (const [k, v] of Object.entries({json.dumps(items)})) localStorage.setItem(k, JSON.stringify(v))")

    def screenshot(self, url: str, name: str, shows: list[str]) -> Path:
        """Open `url`, wait until the page shows every text of `shows`, and write docs/images/`name` atomically."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while not self.js(f"{json.dumps(shows)}.every(t => (document.body?.innerText ?? '').includes(t))"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} does not show {shows}")
            time.sleep(0.5)
        time.sleep(2)  # the last images, fonts and transitions
        target, partial = IMAGES / name, IMAGES / f".{name}.partial"
        partial.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        os.replace(partial, target)
        return target

    def close(self) -> None:
        self.ws.close()
        stop(self.proc)


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-screenshots-") as tmp:
        tmp = Path(tmp)
        root = tmp / "data"
        port, mlflow_port = free_port(), free_port()
        prefect_url, mlflow_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mlflow_port}"
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
        env.pop("PREFECT_API_URL", None)
        started: list[subprocess.Popen] = []
        browser = None
        try:
            # Without PREFECT_UI_API_URL the UI would call the API on the default port, 4200.
            started.append(start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                 {**env, "PREFECT_UI_API_URL": f"{prefect_url}/api"}, tmp / "prefect-server.log"))
            wait_healthy(f"{prefect_url}/api/health")
            print(f"Prefect server at {prefect_url}; running the tiny pipeline ...", flush=True)
            pipeline = subprocess.run(
                [sys.executable, "-m", "flows.pipeline", "--config", "tiny", f"paths.root={root}",
                 f"tracking.ui_url={mlflow_url}", "train.max_steps=30", "eval.limit=2"],
                cwd=REPO, env={**env, "PREFECT_API_URL": f"{prefect_url}/api"},
                capture_output=True, text=True, timeout=1800)
            if pipeline.returncode != 0:
                sys.exit(f"the pipeline failed:\n{pipeline.stdout[-3000:]}\n{pipeline.stderr[-3000:]}")
            started.append(start([str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                                  "--host", "127.0.0.1", "--port", str(mlflow_port)], env, tmp / "mlflow.log"))
            wait_healthy(f"{mlflow_url}/health")

            # The flow run whose Artifacts tab lists the most: the pipeline's or its train-aligner subflow's.
            runs = [run for name in ("thinkdiff-pipeline", "train-aligner")
                    for run in api(f"{prefect_url}/api/flow_runs/filter", {"flows": {"name": {"any_": [name]}}})]
            counts = {run["id"]: len(api(f"{prefect_url}/api/artifacts/filter",
                                         {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})) for run in runs}
            flow_run_id = max(counts, key=counts.get)
            mlflow_api = f"{mlflow_url}/api/2.0/mlflow"
            experiment_id = api(f"{mlflow_api}/experiments/get-by-name?experiment_name=thinkdiff-tiny")[
                "experiment"]["experiment_id"]
            version = api(f"{mlflow_api}/model-versions/get?name=thinkdiff-aligner-tiny&version=1")["model_version"]

            browser = Chromium(tmp / "chromium")
            written = [
                # Prefect's V2 UI: the V1 UI drops ?tab=Artifacts, a tab it hides until the flow run has loaded.
                browser.screenshot(f"{prefect_url}/v2/runs/flow-run/{flow_run_id}?tab=Artifacts",
                                   "prefect-flow-run-artifacts.png", ["mlflow-training-run", "loss-curve"]),
                browser.screenshot(f"{prefect_url}/v2/artifacts", "prefect-artifacts.png",
                                   ["cobsat-table", "corpus-success-rates", "loss-curve"]),
            ]
            # MLflow 3.17's own keys: the Assistant panel closed; the runs table with the metric columns, wide
            # enough for the run names, and the training run unfolded to show its CoBSAT evaluation run.
            widths = {"attributes.`Run Name`": 410, "runDateAndNestInfo": 150, "duration": 90,
                      **{f"metrics.`{key}`": 120 for key in METRICS}}
            browser.set_storage(mlflow_url, {
                "mlflow.assistant.panelOpen_v1": False, "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
                f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': {
                    "selectedColumns": [f"metrics.`{key}`" for key in METRICS], "columnOrder": list(widths),
                    "columnWidths": widths, "runsExpanded": {version["run_id"]: True}}})
            written += [
                browser.screenshot(f"{mlflow_url}/#/experiments/{experiment_id}/runs", "mlflow-runs-table.png",
                                   ["tiny 30 steps", "thinkdiff-aligner-tiny v1 · CoBSAT", "tokens_per_s"]),
                browser.screenshot(f"{mlflow_url}/#/models/thinkdiff-aligner-tiny/versions/1",
                                   "mlflow-model-version.png", [version["description"][:60], "candidate"]),
            ]
        finally:
            if browser:
                browser.close()
            for proc in reversed(started):
                stop(proc)
    for path in written:
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
