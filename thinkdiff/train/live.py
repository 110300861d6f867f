"""A training run shown in MLflow while it trains (`tracking.live_training`).

The run directory stays the record: `metrics.jsonl`, the checkpoints and the manifest are written
whatever MLflow does, and `thinkdiff registry register` (the register-aligner task) logs the run
from them afterwards. This only makes the same MLflow run visible sooner: params at the start,
every logging window's row as it is written, the newest checkpoint's aligner as it is saved, and the
machine's CPU, memory and GPU use (`tracking.system_metrics`, MLflow's own monitor).

Everything is sent from one background thread, so a slow tracking server never slows a step. When
the server cannot be reached at the start, or fails later, live logging stops with one warning and
training goes on; the registration afterwards fills in exactly what the run lacks (points are
matched by key, step and time), in the same MLflow run, and ends it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinkdiff.config import RunConfig

log = logging.getLogger(__name__)

# The live thread gives up on a server that does not answer rather than retrying for minutes (what
# MLflow's client does by default); registration retries later with the defaults of its own process.
_LIVE_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
CLOSE_TIMEOUT_S = 60.0
"""How long the end of training waits for rows still queued for a server that has stopped answering."""
TRAINING_METRICS = ("loss", "lr", "samples_per_s", "tokens_per_s")
"""The metrics.jsonl fields that are MLflow metrics of a training run."""


class LiveTrainingRun:
    """The MLflow run of one training while it trains; every call returns at once. The run is opened
    on the background thread too (opening may wait for the store's lock while another process uploads)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, meta: dict[str, Any]) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        self._monitor: Any = None
        self._queue: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._failed = False
        self._queue.put(("MLflow is not logging this training live", lambda: self._open(cfg, run_dir, meta)))
        self._thread = threading.Thread(target=self._send, name="mlflow-live", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, cfg: RunConfig, run_dir: Path, meta: dict[str, Any]) -> LiveTrainingRun | None:
        """The live run of this training (the MLflow run a killed earlier attempt left RUNNING, when
        it can be continued), or None when `tracking.live_training` is off."""
        if not cfg.tracking.live_training:
            return None
        for key, value in _LIVE_HTTP_ENV.items():
            os.environ.setdefault(key, value)
        return cls(cfg, run_dir, meta)

    def _open(self, cfg: RunConfig, run_dir: Path, meta: dict[str, Any]) -> None:
        from thinkdiff.registry import Registry

        records = Registry(cfg)
        self.run_id = records.open_training_run(run_dir, meta)
        self.client = records.client
        if cfg.tracking.system_metrics:
            self._monitor = records.system_metrics_monitor(self.run_id)
        log.info("training logged live to MLflow run %s (%s)", self.run_id, records.run_url(self.run_id))

    def log_row(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl row, with the same step and time as registration logs it."""
        from mlflow.entities import Metric

        metrics = [Metric(key, float(record[key]), int(record["time"] * 1000), record["step"])
                   for key in TRAINING_METRICS]
        self._queue.put((_STOPPED, lambda: self.client.log_batch(self.run_id, metrics=metrics)))

    def log_checkpoint(self, checkpoint: Path) -> None:
        """The newest checkpoint's aligner and meta (its step), under `checkpoint/`, replacing the one
        before: the run holds the latest, as train.keep_last keeps a few on disk."""

        def upload() -> None:
            try:
                self.client.log_artifacts(self.run_id, str(checkpoint / "aligner"), "checkpoint/aligner")
                self.client.log_artifact(self.run_id, str(checkpoint / "meta.json"), "checkpoint")
            except FileNotFoundError:  # train.keep_last removed it before its turn came: the next one follows
                log.info("checkpoint %s was removed before MLflow got it", checkpoint)

        self._queue.put((_STOPPED, upload))

    def close(self) -> None:
        """Send what is queued (waiting at most CLOSE_TIMEOUT_S) and stop the system metrics. The run
        stays RUNNING: registration ends it, once it has logged what only the finished run has."""
        self._queue.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("MLflow did not take the last live rows within %.0f s; registering the run logs them",
                        CLOSE_TIMEOUT_S)
        if self._monitor is not None:
            self._monitor.finish()

    def _send(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._failed:
                continue
            what, send = job
            try:
                send()
            except Exception as err:  # noqa: BLE001 - a server gone: registration logs what the run lacks
                self._failed = True
                log.warning("%s (%s): training goes on, and registering the run afterwards logs what it lacks",
                            what, str(err).splitlines()[0][:300] if str(err) else type(err).__name__)


_STOPPED = "MLflow stopped taking this training's live rows"
