"""MLflow tracking and model registry (with `aligner_pyfunc`, the aligner as an MLflow Model, and
`train.live`, a training shown while it trains, the only modules that import mlflow).

    thinkdiff registry register --config tiny          # log the finished run + register its aligner
    thinkdiff registry promote --config tiny --version candidate

A finished training run directory (checkpoints, metrics.jsonl, loss_curve.png, manifest.json) is
logged as one MLflow run after the fact, with the original step numbers and timestamps, so a
tracking server that is down during training costs nothing: the checkpoint is on disk and
registration is retried later, never retraining. A training logged live (`thinkdiff.train.live`)
is the same run: registration fills in what it lacks and ends it. Logging and registering are idempotent: the run
is found again by its training fingerprint and the model version by the aligner's sha256, also after
a kill: the writers of one store take turns under a lock file (`_store_lock`), so a run a rerun
finds RUNNING was left so by a killed writer; it is completed, or ended as KILLED and replaced.

Aliases: every new version gets `candidate`; `champion` moves only through `promote`.

    reg = Registry(cfg)          # one MLflow client; the server is checked once, on its first use
    reg.register_checkpoint(run_dir)
    reg.promote("candidate")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from thinkdiff.config import RunConfig, load_config
from thinkdiff.errors import ConfigError, DataContractError, ThinkDiffError, first_line
from thinkdiff.models.aligner import WEIGHTS_NAME, Aligner
from thinkdiff.storage import (
    EVAL_SCHEMA_VERSION,
    corpus_fingerprint,
    exclusive,
    git_revision,
    read_manifest,
    recorded_location,
    recorded_path,
    sha256_file,
    stage_root,
)
from thinkdiff.train.checkpoint import META_FILE

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
TAG_TRAIN_FP = "thinkdiff.train_fingerprint"
TAG_FEATURES_FP = "thinkdiff.features_fingerprint"
TAG_CORPUS_FP = "thinkdiff.corpus_fingerprint"
TAG_CANDIDATE_PENDING = "thinkdiff.candidate_pending"
TAG_ALIGNER_SHA = "thinkdiff.aligner_sha256"
SYSTEM_METRICS_INTERVAL_S = 10.0
TAG_LIVE = "thinkdiff.logged_live"
"""On a run begun while its work ran (a live training, a monitored evaluation), which logging completes."""
TAG_PROMOTION = "thinkdiff.promotion"
TAG_PROMOTION_REASON = "thinkdiff.promotion_reason"
# MLflow 3's UI opens an experiment of this kind on its runs table (metrics as columns), not on the
# GenAI pages (traces, an assistant) it shows an experiment of unknown kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Settings a training run's name leaves out: where things are written and logged, not what is trained.
_UNNAMED_SECTIONS = ("paths.", "tracking.", "eval.", "cluster.", "corpus.processes", "corpus.threads",
                      "features.batch_size")
# The store locks this thread holds, with their depth: an operation that holds one calls others that take it.
_held = threading.local()
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class TrackingUnavailableError(ThinkDiffError):
    """The MLflow tracking server cannot be reached; nothing was lost, retry registration later."""


class RegistryError(ThinkDiffError):
    """A registry request names a model, version or alias that does not exist."""


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str
    run_id: str
    links: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    """Where the MLflow UI (`tracking.ui_url`) shows it: `training run`, `model version` and
    `loss curve` (given by registration)."""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def tracking_uri(cfg: RunConfig) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else a sqlite store under `paths.root`."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = stage_root(cfg).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


# Where MLflow's sqlite store records artifact locations (the tables of MLflow 3; one absent in an
# older schema is skipped).
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("model_versions", "source"),
                     ("model_versions", "storage_location"), ("logged_models", "artifact_location"))


def follow_moved_store(database: Path) -> None:
    """Point a sqlite store's records at the artifacts beside it again after it moved with its root.

    MLflow records absolute artifact locations (experiments, runs, model versions, logged models), so
    the store of a copied or moved paths.root would read the old root's artifacts, or fail when they
    are gone. The store keeps its artifacts in `mlartifacts/` beside the database
    (`Registry.experiment_id`), so an experiment location `<dir>/mlartifacts` whose `<dir>/mlflow.db`
    is not this database is the old place: each recorded location that is it, or under it, is
    rewritten to the same place under this store's `mlartifacts/`. The same store seen at another
    mount point is left alone (its old `mlflow.db` is this very file). Run under the store's init
    lock, before any client of this process reads it."""
    here = (database.parent / "mlartifacts").resolve()
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return
        recorded = {Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path)) for (location,) in
                    db.execute("SELECT artifact_location FROM experiments WHERE artifact_location LIKE 'file://%'")}
        for old in recorded:
            old_database = old.parent / database.name
            if old.name != "mlartifacts" or old == here or (old_database.exists()
                                                            and os.path.samefile(old_database, database)):
                continue
            log.warning("MLflow store %s was made at %s: its records now point at %s", database, old.parent,
                        here.parent)
            for table, column in _ARTIFACT_COLUMNS:
                if table not in tables:
                    continue
                for before, after in ((old.as_uri(), here.as_uri()), (str(old), str(here))):
                    db.execute(f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                               f'WHERE "{column}" = ? OR substr("{column}", 1, ?) = ?',
                               (after, len(before) + 1, before, len(before) + 1, before + "/"))


def store_lock_path(cfg: RunConfig, uri: str) -> Path:
    """The lock file the writers of a tracking store take turns on: beside a sqlite store's database
    (whichever paths.root its users have), else `{paths.root}/mlflow.lock`, which serialises the
    writers of one machine only (or of the machines that share paths.root and its file locks)."""
    database = _sqlite_path(uri)
    return database.with_name(f"{database.name}.lock") if database is not None else Path(cfg.paths.root) / "mlflow.lock"


def redact(uri: str) -> str:
    """The URI without credentials, for messages and logs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer its health check, or
    when a local store's file is not an SQLite database (SQLAlchemy's traceback names no file)."""
    path = _sqlite_path(uri)
    if path is not None:
        with contextlib.suppress(FileNotFoundError), path.open("rb") as db:
            header = db.read(16)
            if header and header != b"SQLite format 3\x00":
                raise DataContractError(f"MLflow store {path} is not an SQLite database: move it away (a new store is "
                                        "made there) or point tracking.uri at the store")
        return
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingUnavailableError(
        f"MLflow tracking server {redact(uri)} is unreachable ({problem}). Checkpoints are kept; once it is up, "
        "rerun registration (`thinkdiff registry register --config ...` or the train-aligner flow): nothing retrains"
    )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.0001", ...} (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def _refuse_other_models(cfg: RunConfig, run_dir: Path, trained: dict[str, Any]) -> None:
    """A run trained for other models than the config's would land in the config's registry, beside
    aligners it cannot stand in for (another VLM's features, another T5's space)."""
    sources = ["t5", "vision" if cfg.variant == "clip" else "vlm"]

    def identity(config: dict[str, Any]) -> dict[str, str]:
        # The weights a model source names (id and revision); its dtype is how they were run, not which.
        models = config.get("models", {})
        named = {f"models.{n}": f"{models.get(n, {}).get('id')} (revision {models.get(n, {}).get('revision')})"
                 for n in sources}
        return {"variant": repr(config.get("variant")), **named}

    run, own = identity(trained), identity(cfg.to_dict())
    differ = [key for key in own if run[key] != own[key]]
    if differ:
        shown = "; ".join(f"{key}: run {run[key]}, config {own[key]}" for key in differ)
        preset = trained.get("preset", "<its preset>")
        raise DataContractError(f"{run_dir} was trained for other models than this config's ({shown}): register it "
                                f"with the config it was trained with (--config {preset} and its overrides)")


def _short_count(n: int) -> str:
    """25000 -> 25k, 1500 -> 1.5k, 12 -> 12."""
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def training_run_name(config: dict[str, Any], steps: int) -> str:
    """`paper-lvlm lr=0.0002 25k steps`: the preset, the settings that differ from it (by their last
    name, at most four), and the steps trained."""
    preset = config.get("preset") or "custom"
    try:
        base = flatten(load_config(preset).to_dict())
    except ConfigError:  # a YAML file, not a preset of conf/: nothing to compare with
        base = {}
    differ = [(key, value) for key, value in sorted(flatten(config).items())  # a manifest's keys are sorted
              if base and key in base and base[key] != value and key != "train.max_steps"
              and not key.startswith(_UNNAMED_SECTIONS)]
    shown = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in differ[:4]]
    if len(differ) > 4:
        shown.append(f"+{len(differ) - 4} more")
    return " ".join([preset, *shown, f"{_short_count(steps)} steps"])


def source_tags(revision: str, entry_point: str) -> dict[str, str]:
    """MLflow's Source column: what ran, at which git revision of this repository."""
    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": entry_point,
            "mlflow.source.git.commit": revision}


def version_description(manifest: dict[str, Any], cobsat_means: dict[int, float]) -> str:
    """A model version's description: what it was trained on, how long, its final loss, and its CoBSAT
    means once evaluated."""
    config = manifest["config"]
    corpus = config.get("corpus", {})
    source = corpus.get("url_list") or "?"
    text = (f"ThinkDiff aligner ({config.get('variant')} variant, preset {config.get('preset')}), trained "
            f"{manifest['step']} steps on the corpus {source} (corpus fingerprint "
            f"{(manifest.get('corpus_fingerprint') or '?')[:12]}); final loss {manifest['loss']:.4f}.")
    return with_cobsat_means(text, cobsat_means)


_MEANS_PREFIX = " CoBSAT mean accuracy: "


def with_cobsat_means(description: str, cobsat_means: dict[int, float]) -> str:
    """`description` with its CoBSAT sentence replaced by these means."""
    text = description.split(_MEANS_PREFIX)[0]
    if cobsat_means:
        text += _MEANS_PREFIX + ", ".join(f"{shot}-shot {m:.3f}" for shot, m in sorted(cobsat_means.items())) + "."
    return text


def prompt_set(tasks: Iterable[int], shots: Iterable[int], num_prompts: int) -> str:
    """Which prompts an evaluation scores, e.g. `tasks 1,4; shots 2; 8 prompts`."""
    return (f"tasks {','.join(map(str, sorted(set(tasks))))}; shots {','.join(map(str, sorted(set(shots))))}; "
            f"{num_prompts} prompts")


def _prompt_set(summary: Any) -> str:
    """The prompt set a summary scored."""
    return prompt_set((t for per_task in summary.accuracy.values() for t in per_task), summary.accuracy,
                      summary.num_prompts)


def _only_system_metrics(run: Any) -> bool:
    """A run `Registry.monitor_evaluation` started: system metrics and no params yet."""
    return not run.data.params and all(key.startswith("system/") for key in run.data.metrics)


class Registry:
    """The tracking server and registered model of one config (`tracking.*`).

    The MLflow client, the tracking URI and the experiment id are made on first use and kept, so
    the server's health check runs once per Registry however many operations follow, and an
    operation that fails before it needs the server (a missing run directory, a path that is not a
    registry URI) never contacts it.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._uri: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None

    @property
    def uri(self) -> str:
        """The tracking (and registry) URI, as `tracking_uri` resolves it."""
        if self._uri is None:
            self._uri = tracking_uri(self.cfg)
        return self._uri

    @contextlib.contextmanager
    def _store_lock(self):
        """Hold the store's lock file (`store_lock_path`); reentrant within a thread.

        Every find-or-create of a run holds it from its search until the run is ended, so two live
        processes never both create the run, and a RUNNING run seen under it is stale: its writer
        was killed (the lock goes with the process). For a remote tracking server this holds per
        machine only: a RUNNING run may then be another machine's live registration.
        """
        path = store_lock_path(self.cfg, self.uri).resolve()
        depth = getattr(_held, "depth", None)
        if depth is None:
            depth = _held.depth = {}
        if depth.get(path):
            depth[path] += 1
            try:
                yield
            finally:
                depth[path] -= 1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(path, f"waiting for another process writing to MLflow store {redact(self.uri)} "
                             f"(it holds {path})"):
            depth[path] = 1
            try:
                yield
            finally:
                del depth[path]

    @property
    def client(self):
        """The MLflow client, built after the server answers its health check."""
        if self._client is None:
            uri, database = self.uri, _sqlite_path(self.uri)
            if database is None:
                self._client = self._open(uri)
                return self._client
            # MLflow creates a new sqlite store's tables (alembic migrations) when a client first
            # touches it, tracking and registry tables apart; two processes doing so at once break
            # each other's migrations. Under this lock one creates them and the other finds them. It is
            # not the writers' lock, so that opening a store never waits for another process's upload.
            database.parent.mkdir(parents=True, exist_ok=True)
            with exclusive(database.with_name(f"{database.name}.init.lock"),
                           f"waiting for another process creating or opening MLflow store {database}"):
                client = self._open(uri)
                client.search_registered_models(max_results=1)
                follow_moved_store(database)
                self._client = client
        return self._client

    @staticmethod
    def _open(uri: str):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        check_reachable(uri)
        try:
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        except MlflowException as err:  # an unknown scheme, named in a traceback otherwise
            problem = first_line(err, 300).replace(uri, redact(uri))
            raise ConfigError(f"tracking.uri={redact(uri)!r}: MLflow cannot open it ({problem}); use e.g. "
                              "http://host:5000, or leave it empty for the sqlite store under paths.root") from None

    @property
    def experiment_id(self) -> str:
        """The id of `tracking.experiment`, which is created when it does not exist yet."""
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            client, name = self.client, self.cfg.tracking.experiment
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                self._experiment_id = experiment.experiment_id
                if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the kind was set
                    client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return self._experiment_id
            # A local store keeps artifacts beside its database; a server decides for itself.
            database = _sqlite_path(self.uri)
            location = (database.parent / "mlartifacts").as_uri() if database is not None else None
            with self._store_lock():
                experiment = client.get_experiment_by_name(name)  # made while this process waited
                try:
                    self._experiment_id = (experiment.experiment_id if experiment is not None
                                           else client.create_experiment(name, artifact_location=location,
                                                                         tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
                except MlflowException as err:  # another machine made it first (the lock is per machine)
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    self._experiment_id = client.get_experiment_by_name(name).experiment_id
        return self._experiment_id

    @property
    def registered_model(self) -> str:
        return self.cfg.tracking.registered_model

    @property
    def ui_url(self) -> str:
        """The MLflow UI of this store: `tracking.ui_url`, else the tracking server, else where
        `mlflow ui` serves by default."""
        if self.cfg.tracking.ui_url:
            return self.cfg.tracking.ui_url.rstrip("/")
        return self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"

    def runs_url(self) -> str:
        """The experiment's runs table in the MLflow UI."""
        return f"{self.ui_url}/#/experiments/{self.experiment_id}/runs"

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_url}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def version_url(self, version: str) -> str:
        return f"{self.ui_url}/#/models/{urllib.parse.quote(self.registered_model)}/versions/{version}"

    def artifact_url(self, run_id: str, path: str) -> str:
        """A run's artifact file as the MLflow server serves it (an image shows in a browser)."""
        return f"{self.ui_url}/get-artifact?{urllib.parse.urlencode({'path': path, 'run_uuid': run_id})}"

    def log_training_run(self, run_dir: Path) -> str:
        """Log a finished training run directory as one MLflow run (once); returns the run id.

        Raises:
            FileNotFoundError: the run has not finished (no manifest.json).
            TrackingUnavailableError: an HTTP tracking server does not answer.
        """
        cfg = self.cfg
        if not run_dir.is_dir():
            raise FileNotFoundError(f"training run {run_dir}: no such directory; train first, or name the run "
                                    "directory `thinkdiff train` printed with --run")
        manifest = read_manifest(run_dir, "train")
        if manifest is None:
            # A checkpoint (it holds meta.json) or its aligner, or the checkpoints folder: name their run.
            checkpoint = next((p for p in (run_dir, run_dir.parent)
                               if (p / META_FILE).is_file() and p.parent.name == "checkpoints"), None)
            if checkpoint is not None or (run_dir.name == "checkpoints" and read_manifest(run_dir.parent) is not None):
                run = checkpoint.parents[1] if checkpoint is not None else run_dir.parent
                raise FileNotFoundError(f"{run_dir} is inside the training run {run}: give the run directory itself")
            raise FileNotFoundError(f"{run_dir}/manifest.json not found: the training run has not finished; train "
                                    "first (a rerun resumes from its last checkpoint)")
        _refuse_other_models(cfg, run_dir, manifest["config"])
        # A damaged aligner is refused here, not by the evaluation that would load it from the registry.
        Aligner.from_pretrained(recorded_location(manifest["checkpoint"], run_dir) / "aligner")
        with self._store_lock():
            return self._log_training_run(run_dir, manifest)

    def open_training_run(self, run_dir: Path, meta: dict[str, Any]) -> str:
        """The MLflow run a training logs into while it trains (`thinkdiff.train.live`): the one a
        killed attempt of the same run left RUNNING when it can be continued, else a new one; its
        params are logged. Registration completes and ends the same run afterwards."""
        from thinkdiff.train.loop import METRICS_FILE, read_metrics

        with self._store_lock():
            run_id, params, _ = self._open_training_run(run_dir, meta, read_metrics(run_dir / METRICS_FILE))
            self.client.set_tag(run_id, TAG_LIVE, "true")
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i: i + 100])
        return run_id

    def _open_training_run(self, run_dir: Path, meta: dict[str, Any], records: list[dict]) -> tuple[str, list, list]:
        """The run of this training (`meta`: a checkpoint's or the manifest's) and the params and
        metrics of `records` (metrics.jsonl rows) it still lacks. Call it holding the store's lock.

        A RUNNING run of the same fingerprint, left by a live training or a killed registration, is
        continued when everything it holds comes from this run directory (its identity tags, params,
        and metric points matched by key, step and time: a file store, unlike a database one, keeps a
        point logged twice twice); anything else (another copy of the directory, rows a resumed
        training logged again) gets it ended as KILLED and a new run made."""
        from mlflow.entities import Metric, Param

        from thinkdiff.train.live import TRAINING_METRICS

        client, fingerprint = self.client, meta["train_fingerprint"]
        root = stage_root(self.cfg)  # paths inside it are tagged relative to it
        # What the run is: compared with a RUNNING run's to continue it. Its name and source (below) are
        # only set: a run renamed in the UI, or a preset edited since, is still this run.
        identity = {
            TAG_TRAIN_FP: fingerprint,
            TAG_FEATURES_FP: meta["features_fingerprint"],
            # Feature stores made before their manifest recorded it: the config's corpus.
            TAG_CORPUS_FP: meta.get("corpus_fingerprint") or corpus_fingerprint(self.cfg),
            "thinkdiff.run_dir": recorded_path(run_dir, root),
            "thinkdiff.preset": meta["config"].get("preset", self.cfg.preset),
        }
        tags = {"mlflow.runName": training_run_name(meta["config"], meta["config"]["train"]["max_steps"]),
                **source_tags(meta["git_revision"], "thinkdiff train"), **identity}
        params = [Param(k, v[:6000]) for k, v in flatten(meta["config"]).items()]
        metrics = [Metric(key, float(r[key]), int(r["time"] * 1000), r["step"])
                   for r in records for key in TRAINING_METRICS]
        wanted = {(m.key, m.step, m.timestamp) for m in metrics}
        logged: dict[str, set] = {}

        def points(run: Any) -> set:
            if run.info.run_id not in logged:
                logged[run.info.run_id] = {(m.key, m.step, m.timestamp) for key in TRAINING_METRICS
                                           for m in client.get_metric_history(run.info.run_id, key)}
            return logged[run.info.run_id]

        def resumable(run: Any) -> bool:
            held = run.data.params
            return (all(run.data.tags.get(k) == v for k, v in identity.items())
                    and all(held.get(p.key, p.value) == p.value for p in params) and points(run) <= wanted)

        stale = self._stale_run(f"tags.`{TAG_TRAIN_FP}` = '{fingerprint}'", resumable)
        if stale is None:
            started_at = meta.get("started_at") or (records[0]["time"] if records else time.time())
            return client.create_run(self.experiment_id, start_time=int(started_at * 1000), tags=tags).info.run_id, \
                params, metrics
        run_id = stale.info.run_id
        return (run_id, [p for p in params if p.key not in stale.data.params],
                [m for m in metrics if (m.key, m.step, m.timestamp) not in points(stale)])

    def _log_training_run(self, run_dir: Path, manifest: dict[str, Any]) -> str:
        from mlflow.entities import RunTag

        # Here, not at the top: the training loop brings transformers and the T5 code, which loading or
        # promoting an aligner through this module never needs.
        from thinkdiff.aligner_pyfunc import save_aligner_model
        from thinkdiff.train.loop import METRICS_FILE, read_metrics

        client, experiment_id = self.client, self.experiment_id
        fingerprint = manifest["train_fingerprint"]
        found = client.search_runs([experiment_id], max_results=1,
                                   filter_string=f"tags.`{TAG_TRAIN_FP}` = '{fingerprint}' "
                                                 "and attributes.status = 'FINISHED'")
        if found:
            log.info("training run %s is already logged as MLflow run %s", run_dir, found[0].info.run_id)
            return found[0].info.run_id
        records = read_metrics(run_dir / METRICS_FILE)
        run_id, params, metrics = self._open_training_run(run_dir, manifest, records)
        root = stage_root(self.cfg)
        # What only the finished run has: its description and final checkpoint.
        client.log_batch(run_id, tags=[
            RunTag("mlflow.note.content", f"ThinkDiff aligner training ({manifest['config'].get('variant')} variant): "
                                          f"{manifest['step']} steps, final loss {manifest['loss']:.4f}. Fingerprint "
                                          f"{fingerprint}; run directory {recorded_path(run_dir, root)} under "
                                          "paths.root."),
            RunTag("thinkdiff.checkpoint", recorded_path(recorded_location(manifest["checkpoint"], run_dir), root)),
        ])
        try:
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=params[i: i + 100])
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i: i + 1000])
            with tempfile.TemporaryDirectory() as tmp:
                config_file = Path(tmp) / "config.yaml"
                config_file.write_text(yaml.safe_dump(manifest["config"], sort_keys=False, width=100))
                client.log_artifact(run_id, str(config_file))
            for name in ("loss_curve.png", METRICS_FILE, "manifest.json"):
                if (run_dir / name).is_file():
                    client.log_artifact(run_id, str(run_dir / name))
            checkpoint = recorded_location(manifest["checkpoint"], run_dir)
            # The aligner as an MLflow Model: MLmodel, its weights under artifacts/aligner, the code, the requirements.
            with tempfile.TemporaryDirectory() as tmp:
                model_dir = save_aligner_model(checkpoint / "aligner", Path(tmp) / "aligner")
                client.log_artifacts(run_id, str(model_dir), "aligner")
            client.log_artifact(run_id, str(checkpoint / "meta.json"), "aligner")
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        end_ms = int(records[-1]["time"] * 1000) if records else int(time.time() * 1000)
        client.set_terminated(run_id, status="FINISHED", end_time=end_ms)
        log.info("logged training run %s as MLflow run %s (%s)", run_dir, run_id, redact(self.uri))
        return run_id

    def _stale_run(self, same_run: str, resumable: Callable[[Any], bool]) -> Any:
        """The RUNNING run matching the `same_run` filter that a killed writer left, to complete, or
        None after ending each such run that `resumable` refuses as KILLED. Call it holding the
        store's lock: no live writer of this machine holds a RUNNING run then."""
        client, kept = self.client, None
        running = client.search_runs([self.experiment_id], f"{same_run} and attributes.status = 'RUNNING'")
        for run in running:
            if kept is None and resumable(run):
                kept = run
                if TAG_LIVE in run.data.tags:  # begun while its work ran, to be completed now
                    log.info("completing MLflow run %s, logged while it ran", run.info.run_id)
                else:
                    log.warning("MLflow run %s was left RUNNING by a stopped writer; completing it", run.info.run_id)
            else:
                client.set_terminated(run.info.run_id, status="KILLED")
                log.warning("MLflow run %s was left RUNNING by a stopped writer; ended it as KILLED",
                            run.info.run_id)
        return kept

    def register_checkpoint(self, run_dir: Path) -> ModelVersionRef:
        """Log the run (if needed) and register its final aligner; new versions get `candidate`.

        Registering the same aligner again returns the existing version (matched by sha256).
        """
        run_id = self.log_training_run(run_dir)
        # Two processes registering the same aligner at once would each find no version with its sha256.
        with self._store_lock():
            ref = self._register_version(run_dir, run_id)
        return replace(ref, links={"training run": self.run_url(run_id), "model version": self.version_url(ref.version),
                                   "loss curve": self.artifact_url(run_id, "loss_curve.png")})

    def _register_version(self, run_dir: Path, run_id: str) -> ModelVersionRef:
        client, name = self.client, self.registered_model
        manifest = read_manifest(run_dir)
        assert manifest is not None  # log_training_run checked it
        digest = sha256_file(recorded_location(manifest["checkpoint"], run_dir) / "aligner" / WEIGHTS_NAME)
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(name,
                                           description="ThinkDiff aligner: VLM token features -> T5 encoder space")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        existing = self.version_with_weights(digest)
        if existing is not None:
            log.info("aligner %s is already registered as %s version %s", digest[:12], name, existing.version)
            # An earlier call stopped before the alias.
            if TAG_CANDIDATE_PENDING in client.get_model_version(name, existing.version).tags:
                self._make_candidate(existing.version)
            return existing
        run = client.get_run(run_id)
        version = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/aligner",
            run_id=run_id,
            tags={TAG_ALIGNER_SHA: digest, TAG_TRAIN_FP: manifest["train_fingerprint"],
                  TAG_FEATURES_FP: manifest["features_fingerprint"], TAG_CANDIDATE_PENDING: "true"},
            description=version_description(manifest, {}),
        )
        self._make_candidate(str(version.version))
        log.info("registered %s version %s (alias %s)", name, version.version, CANDIDATE)
        return ModelVersionRef(name=name, version=str(version.version), run_id=run_id)

    def _make_candidate(self, version: str) -> None:
        """Point `candidate` at a newly registered version unless a newer one holds it, then drop the tag
        that marks the version as owed the alias: a registration stopped in between finishes when run
        again, and neither it nor an older version found again takes the alias from a newer one."""
        name = self.registered_model
        held = self.current_version(CANDIDATE)
        if held is None or int(held.version) < int(version):
            self.client.set_registered_model_alias(name, CANDIDATE, version)
        self.client.delete_model_version_tag(name, version, TAG_CANDIDATE_PENDING)

    def version_with_weights(self, digest: str) -> ModelVersionRef | None:
        """The version of `tracking.registered_model` whose aligner weights have this sha256, if any."""
        name = self.registered_model
        found = self.client.search_model_versions(f"name='{name}' and tags.`{TAG_ALIGNER_SHA}` = '{digest}'")
        return ModelVersionRef(name=name, version=str(found[0].version), run_id=found[0].run_id) if found else None

    def trained_vlm(self, ref: ModelVersionRef) -> str | None:
        """The `models.vlm.id` whose features a version's aligner was trained on (its training run's
        param; None for a version registered by other means)."""
        return self.client.get_run(ref.run_id).data.params.get("models.vlm.id") if ref.run_id else None

    def weights_digest(self, ref: ModelVersionRef) -> str | None:
        """The sha256 of a version's aligner weights, recorded when it was registered (None for a
        version registered by other means)."""
        return self.client.get_model_version(ref.name, ref.version).tags.get(TAG_ALIGNER_SHA)

    def record_promotion_decision(self, version: str, promoted: bool, reason: str) -> None:
        """Tag an evaluated candidate with the nightly decision (`promoted` or `not promoted`) and its
        reason, which gives both scores."""
        name = self.registered_model
        self.client.set_model_version_tag(name, version, TAG_PROMOTION, "promoted" if promoted else "not promoted")
        self.client.set_model_version_tag(name, version, TAG_PROMOTION_REASON, reason)

    def promote(self, version: str, reason: str = "manual promotion") -> ModelVersionRef:
        """Point `champion` at a version (a number or an alias such as `candidate`); recorded as tags."""
        client, name = self.client, self.registered_model
        target = self._resolve_version(name, version)
        previous = None
        try:
            previous = client.get_model_version_by_alias(name, CHAMPION).version
        except Exception:  # noqa: BLE001 - no champion yet
            previous = None
        if str(previous) == str(target.version):  # idempotent: the first promotion's time and reason stay
            log.info("%s: version %s is already the champion; nothing changed", name, target.version)
            return ModelVersionRef(name=name, version=str(target.version), run_id=target.run_id)
        client.set_registered_model_alias(name, CHAMPION, target.version)
        promoted_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        client.set_model_version_tag(name, target.version, "thinkdiff.promoted_at", promoted_at)
        client.set_model_version_tag(name, target.version, TAG_PROMOTION_REASON, reason)
        client.set_model_version_tag(name, target.version, "thinkdiff.previous_champion", str(previous))
        log.info("%s: champion %s -> version %s (%s)", name, previous, target.version, reason)
        return ModelVersionRef(name=name, version=str(target.version), run_id=target.run_id)

    def _resolve_version(self, name: str, version: str):
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            if str(version).isdigit():
                return client.get_model_version(name, str(version))
            return client.get_model_version_by_alias(name, str(version))
        except MlflowException as err:
            raise RegistryError(f"{name}: no version or alias {version!r}; {self._what_exists(name)}") from err

    def _what_exists(self, name: str) -> str:
        """The versions and aliases a registered model has, for an error message."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = self.client.get_registered_model(name).aliases
        except MlflowException:
            return "no model of that name is registered yet (train, then `thinkdiff registry register`)"
        versions = sorted(int(v.version) for v in self.client.search_model_versions(f"name='{name}'"))
        shown = ", ".join(f"@{alias} (version {v})" for alias, v in sorted(aliases.items())) or "none"
        return f"it has versions {', '.join(map(str, versions)) or 'none'} and aliases {shown}"

    def load_aligner(self, uri: str) -> Aligner:
        """An aligner from `models:/name@alias`, `models:/name/3` or a saved directory."""
        match = _MODEL_URI.match(uri)
        if match is None:
            return Aligner.from_pretrained(uri)
        import mlflow.artifacts

        from thinkdiff.aligner_pyfunc import aligner_files

        version = self._resolve_version(match["name"], match["alias"] or match["version"])
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=tmp,
                                                        tracking_uri=self.uri)
            # An MLflow Model, or a version registered before aligners were: the bare aligner files.
            return Aligner.from_pretrained(aligner_files(local))

    def resolve_model(self, uri: str) -> ModelVersionRef:
        """`models:/name@alias` or `models:/name/N` -> the version it points to now."""
        match = _MODEL_URI.match(uri)
        if match is None:
            raise RegistryError(f"{uri!r} is not a registry URI (models:/name@alias or models:/name/N)")
        version = self._resolve_version(match["name"], match["alias"] or match["version"])
        return ModelVersionRef(name=match["name"], version=str(version.version), run_id=version.run_id)

    def current_version(self, alias: str) -> ModelVersionRef | None:
        """The version an alias points to, or None when the alias (or the model) does not exist."""
        try:
            return self.resolve_model(f"models:/{self.registered_model}@{alias}")
        except RegistryError:
            return None

    def log_evaluation(self, out_dir: Path, summary: Any, model: ModelVersionRef | None, generator: str) -> str:
        """Log a finished CoBSAT evaluation as an MLflow run, once per results directory and prompt set
        (tasks, shots and count: a nightly subset and a full run share the directory, not the run).

        Metrics: accuracy per task and shot (`cobsat.2shot.C-I`), the mean per shot, images/s and
        seconds per prompt; artifacts: the table, results.jsonl, the bar chart, the sample grid and the
        generated images. The run of an evaluated model version is a child of the version's training
        run (nested under it in the MLflow UI), and the version gets `cobsat.mean.{shot}shot` tags from
        its evaluation over the most prompts (`cobsat.prompts`) of the current schema
        (`cobsat.eval_schema`), with `cobsat.judge`.
        """
        with self._store_lock():
            return self._log_evaluation(out_dir, summary, model, generator)

    def _log_evaluation(self, out_dir: Path, summary: Any, model: ModelVersionRef | None, generator: str) -> str:
        client, experiment_id = self.client, self.experiment_id
        same_run = (f"tags.`thinkdiff.eval_dir` = '{out_dir.name}' "
                    f"and tags.`thinkdiff.eval_set` = '{_prompt_set(summary)}'")
        found = client.search_runs([experiment_id], max_results=1,
                                   filter_string=f"{same_run} and attributes.status = 'FINISHED'")
        links = {}
        if model is not None:
            links = {"thinkdiff.model": model.name, "thinkdiff.model_version": model.version}
            if model.run_id:
                links["mlflow.parentRunId"] = model.run_id
        if found:
            run_id = found[0].info.run_id
            # Logged by the aligner's directory before it was registered: linked to its version now.
            if "thinkdiff.model_version" not in found[0].data.tags:  # never re-pointed once linked
                for key, value in links.items():
                    client.set_tag(run_id, key, value)
        else:
            # A run a killed evaluation left RUNNING is ended as KILLED and replaced, not completed: its
            # metrics are stamped with the time they were logged (logged again they would be points of
            # their own), and its params and links come from that evaluation's config and model, which
            # may differ from this one's where the prompt set does not show it (MLflow refuses a param
            # logged again with another value). The run `monitor_evaluation` started holds system
            # metrics only: it is completed.
            monitored = self._stale_run(same_run, _only_system_metrics)
            run_id = self._log_evaluation_run(out_dir, summary, generator, links,
                                              monitored.info.run_id if monitored is not None else None)
        if model is not None:
            tagged = client.get_model_version(model.name, model.version).tags
            # A nightly subset does not hide a full run, unless that run's verdicts are of an older schema.
            older = int(tagged.get("cobsat.eval_schema", 1)) < EVAL_SCHEMA_VERSION
            if older or summary.num_prompts >= int(tagged.get("cobsat.prompts", 0)):
                for shot, mean in summary.mean.items():
                    client.set_model_version_tag(model.name, model.version, f"cobsat.mean.{shot}shot", f"{mean:.4f}")
                client.set_model_version_tag(model.name, model.version, "cobsat.prompts", str(summary.num_prompts))
                # Which judge gave these means: an LLaVA and a Qwen2-VL verdict are not the same score.
                client.set_model_version_tag(model.name, model.version, "cobsat.judge", summary.judge)
                client.set_model_version_tag(model.name, model.version, "cobsat.eval_schema", str(EVAL_SCHEMA_VERSION))
                client.set_model_version_tag(model.name, model.version, "cobsat.eval_run", run_id)
                described = client.get_model_version(model.name, model.version).description or ""
                client.update_model_version(model.name, model.version,
                                            description=with_cobsat_means(described, summary.mean))
        return run_id

    def _log_evaluation_run(self, out_dir: Path, summary: Any, generator: str, links: dict[str, str],
                            run_id: str | None = None) -> str:
        from mlflow.entities import Metric, Param, RunTag

        from thinkdiff.eval.cobsat import get_task

        client, cfg = self.client, self.cfg
        evaluated = (f"{links['thinkdiff.model']} v{links['thinkdiff.model_version']}" if "thinkdiff.model" in links
                     else generator)
        shots = "/".join(map(str, sorted(summary.accuracy)))
        tags = {"mlflow.runName": f"{evaluated} · CoBSAT {shots}-shot · {summary.num_prompts} prompts",
                "mlflow.note.content": (f"CoBSAT evaluation of {evaluated}: {_prompt_set(summary)}, judged by "
                                        f"{summary.judge}. Results directory eval/{out_dir.name} under paths.root."),
                **source_tags(git_revision(), "thinkdiff eval cobsat"),
                "thinkdiff.kind": "cobsat-eval", "thinkdiff.eval_dir": out_dir.name,
                "thinkdiff.eval_prompts": str(summary.num_prompts), "thinkdiff.eval_set": _prompt_set(summary),
                "thinkdiff.generator": generator, "thinkdiff.preset": cfg.preset, "thinkdiff.judge": summary.judge,
                **links}
        # The run spans the drawing and judging of its prompts (their recorded seconds, or since the
        # monitored run began), not its logging.
        now = int(time.time() * 1000)
        if run_id is None:
            work_ms = int(summary.num_prompts * (summary.gen_s_per_prompt + summary.judge_s_per_prompt) * 1000)
            run_id = client.create_run(self.experiment_id, start_time=now - work_ms, tags=tags).info.run_id
        else:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        try:
            metrics = [Metric(f"cobsat.{shot}shot.{get_task(t).short}", acc, now, 0)
                       for shot, per_task in summary.accuracy.items() for t, acc in per_task.items()]
            metrics += [Metric(f"cobsat.{shot}shot.mean", mean, now, 0) for shot, mean in summary.mean.items()]
            for name, values in (("clip_correct", summary.clip_accuracy), ("clip_similarity", summary.clip_similarity)):
                metrics += [Metric(f"cobsat.{shot}shot.{get_task(t).short}.{name}", v, now, 0)
                            for shot, per_task in values.items() for t, v in per_task.items()]
            metrics += [Metric(name, getattr(summary, name), now, 0)
                        for name in ("gen_images_per_s", "gen_s_per_prompt", "judge_s_per_prompt")]
            client.log_batch(run_id, metrics=metrics)
            params = [Param(k, v[:6000]) for k, v in flatten({"eval": cfg.eval.__dict__}).items()]
            client.log_batch(run_id, params=params)
            for name in ("summary.md", "summary.json", "results.jsonl", "accuracy.png", "samples.png"):
                if (out_dir / name).is_file():
                    client.log_artifact(run_id, str(out_dir / name))
            client.log_artifacts(run_id, str(out_dir / "results"), "results")
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED", end_time=now)
        log.info("logged CoBSAT evaluation %s as MLflow run %s", out_dir, run_id)
        return run_id

    def system_metrics_monitor(self, run_id: str) -> Any:
        """MLflow's system metrics monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) for a
        RUNNING run, started: it samples every 10 s and stops when told (`finish`) or the run ends."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=True,
                                       tracking_uri=self.uri)
        monitor.start()
        return monitor

    @contextlib.contextmanager
    def monitored_evaluation(self, out_dir: Path, prompts: str) -> Iterator[None]:
        """With `tracking.system_metrics`, this evaluation's MLflow run begins now and holds MLflow's
        system metrics while the body draws and judges; `log_evaluation` completes it, and a body
        that fails ends it as FAILED. Nothing when the setting is off, the evaluation is logged
        already, or the store cannot be reached: the evaluation goes on."""
        started = self._monitor_evaluation(out_dir, prompts)
        try:
            yield
        except BaseException:
            if started is not None:
                with contextlib.suppress(Exception):
                    self.client.set_terminated(started[0], status="FAILED")
            raise
        finally:
            if started is not None:
                started[1].finish()

    def _monitor_evaluation(self, out_dir: Path, prompts: str) -> tuple[str, Any] | None:
        if not self.cfg.tracking.system_metrics:
            return None
        try:
            with self._store_lock():
                same_run = f"tags.`thinkdiff.eval_dir` = '{out_dir.name}' and tags.`thinkdiff.eval_set` = '{prompts}'"
                if self.client.search_runs([self.experiment_id], f"{same_run} and attributes.status = 'FINISHED'"):
                    return None
                running = self._stale_run(same_run, _only_system_metrics)
                run_id = running.info.run_id if running is not None else self.client.create_run(
                    self.experiment_id, tags={"mlflow.runName": f"CoBSAT evaluation ({prompts}), drawing",
                                              "thinkdiff.kind": "cobsat-eval", "thinkdiff.eval_dir": out_dir.name,
                                              "thinkdiff.eval_set": prompts, TAG_LIVE: "true"}).info.run_id
            return run_id, self.system_metrics_monitor(run_id)
        except Exception as err:  # noqa: BLE001 - the metrics are a view of the work, never a reason to stop it
            log.warning("no system metrics for this evaluation: %s", first_line(err, 300))
            return None

    def log_comparison(self, run_id: str, paths: list[Path], *, replace: bool) -> None:
        """Attach the side-by-side table and chart to an evaluation's run (a finished run takes
        artifacts): all of them when they were rewritten, else those the run lacks."""
        logged = {a.path for a in self.client.list_artifacts(run_id)}
        for path in paths:
            if replace or path.name not in logged:
                self.client.log_artifact(run_id, str(path))
