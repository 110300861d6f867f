"""CoBSAT as a pipeline stage: one generator's evaluation into `{paths.root}/eval/{fingerprint}/`,
logged to MLflow beside its baselines, and the nightly run that promotes the better registered aligner.

Both return typed results that name what they wrote, so the CLI and the Prefect tasks print or pass
them on without knowing the directory's layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path

from thinkdiff import cluster, registry
from thinkdiff.config import RunConfig, config_from_dict, fingerprint
from thinkdiff.errors import ConfigError, DataContractError
from thinkdiff.eval import dataset, harness, judge
from thinkdiff.models.aligner import weights_sha256
from thinkdiff.pipeline import aligner_spec
from thinkdiff.storage import EVAL_SCHEMA_VERSION, recorded_path, stage_root
from thinkdiff.train.checkpoint import META_FILE

log = logging.getLogger(__name__)

ALIGNER_GENERATORS = ("thinkdiff", "hybrid")
"""The generators that draw with an aligner (the one named by `model`, else eval.aligner, else this config's own)."""


@dataclasses.dataclass(frozen=True)
class CobsatEvaluation:
    """One generator's CoBSAT evaluation (with `eval.baselines` beside it) and where it lies; a
    skipped one (`skipped` says why) has no files, run or summary."""

    table: str
    """The accuracy table (side by side with the baselines when they were drawn), or why there is none."""
    results_dir: Path | None = None
    summary: harness.Summary | None = None
    run_id: str | None = None
    """The MLflow run the results directory is logged as."""
    run_url: str | None = None
    """That run in the MLflow UI (`tracking.ui_url`)."""
    model: registry.ModelVersionRef | None = None
    """The registered version evaluated (also when named by its directory); None if not registered."""
    baselines: dict[str, harness.Summary] = dataclasses.field(default_factory=dict)
    skipped: str | None = None

    def _file(self, name: str) -> Path | None:
        return self.results_dir / name if self.results_dir is not None else None

    @property
    def results_jsonl(self) -> Path | None:
        return self._file(harness.RESULTS)

    @property
    def summary_md(self) -> Path | None:
        return self._file(harness.SUMMARY_TABLE)

    @property
    def summary_json(self) -> Path | None:
        return self._file(harness.SUMMARY_JSON)

    @property
    def accuracy_png(self) -> Path | None:
        return self._file(harness.ACCURACY_CHART)

    @property
    def samples_png(self) -> Path | None:
        return self._file(harness.SAMPLES_GRID)

    @property
    def comparison_md(self) -> Path | None:
        """The side-by-side table, written only when baselines were drawn beside the aligner."""
        return self._file(harness.COMPARISON[0]) if self.baselines else None

    @property
    def comparison_png(self) -> Path | None:
        return self._file(harness.COMPARISON[1]) if self.baselines else None

    @property
    def mean_accuracy(self) -> float:
        """The mean over the evaluated shots of the mean accuracy per shot: what promotion compares."""
        if self.summary is None:
            raise ValueError(f"no accuracy: the evaluation was skipped ({self.skipped})")
        return sum(self.summary.mean.values()) / len(self.summary.mean)


@dataclasses.dataclass(frozen=True)
class NightlyEvaluation:
    """The nightly run: which versions held the aliases, how each evaluated one scored, what was promoted."""

    champion: str | None
    """The `@champion` version when the run began, or None."""
    candidate: str | None
    evaluations: dict[str, CobsatEvaluation]
    """By role (`champion`, `candidate`): only the versions evaluated (an older candidate is not)."""
    promoted: str | None
    """The version promoted to champion, or None."""

    def report(self) -> dict[str, str | float | None]:
        """The versions, each evaluated role's mean accuracy and the promoted version, as plain JSON values."""
        means = {f"{role}_mean": evaluation.mean_accuracy for role, evaluation in self.evaluations.items()}
        return {"champion": self.champion, "candidate": self.candidate, **means, "promoted": self.promoted}


def clip_scorer(cfg: RunConfig):
    """CoBSAT's CLIP metric with `eval.clip_model`, loaded once per process."""
    from thinkdiff.eval.clip_score import load_clip_scorer
    from thinkdiff.models.common import shared

    return shared(load_clip_scorer, cfg.eval.clip_model)


def built_on_first_call(build: Callable[[], Callable]) -> Callable:
    """A stand-in for the callable `build()` makes, made at its first call."""
    made = functools.cache(build)
    return lambda *args: made()(*args)


def evaluate_cobsat(cfg: RunConfig, model: str | None = None) -> CobsatEvaluation:
    """CoBSAT with `eval.generator` into {paths.root}/eval/{fingerprint}/ (resumable), logged to MLflow.

    For the thinkdiff generator the aligner is `model` (e.g. models:/name@champion), else
    `eval.aligner`, else this config's own trained aligner; a registry alias is pinned to the
    version it names now, so results are logged against that version. Beside it, each of
    `eval.baselines` is evaluated with the same settings (in its own directory, so drawn once
    whatever the aligner) and `comparison.md` / `comparison.png` show them side by side. The
    generators and the judge are loaded at their first call: a run whose results are all there
    loads no model, and the models are shared with the rest of the process
    (`thinkdiff.models.common.shared`).
    """
    from thinkdiff import generate  # FLUX (diffusers) only when something is drawn

    e = cfg.eval
    if model is not None and e.generator not in ALIGNER_GENERATORS:
        raise ConfigError(f"an aligner was named ({model}), but eval.generator={e.generator} draws without one: set "
                          "eval.generator=thinkdiff, or leave the aligner out")
    if cfg.variant == "clip":
        note = "CoBSAT scores ThinkDiff-LVLM; skipped for variant clip (use `thinkdiff compose`)"
        log.info(note)
        return CobsatEvaluation(table=note, skipped=note)
    ref, records = None, registry.Registry(cfg)  # one tracking-server check for the evaluation
    drawn_with = None  # the aligner, for the generators that draw with one
    if e.generator in harness.BASELINES:
        generator, identity = harness.BASELINES[e.generator], e.generator
        label = identity
    elif e.generator in ("text-bridge", "tbdn"):
        generator, identity = built_on_first_call(lambda: generate.build_generator(cfg, None)), e.generator
        label = identity
    else:
        spec = aligner_spec(cfg, model)
        if spec.startswith("models:/"):
            ref = records.resolve_model(spec)
            spec, digest = ref.uri, records.weights_digest(ref)
            _refuse_another_vlm(cfg, spec, records.trained_vlm(ref))
        else:
            _refuse_another_vlm(cfg, spec, _checkpoint_vlm(Path(spec)))
            digest = weights_sha256(spec)
            try:  # a registered aligner named by its path is logged against its version
                ref = records.version_with_weights(digest)
            except registry.TrackingUnavailableError as err:  # draw now; the logging at the end waits for the server
                log.warning("%s; evaluating %s without looking up its registry version", err, spec)
        generator = built_on_first_call(lambda: generate.build_generator(cfg, spec))
        drawn_with = spec
        # Results are keyed by the weights: one aligner named by path or by version is drawn once.
        identity = f"aligner-sha256:{digest}" if digest else spec
        label = ref.uri if ref is not None else spec
    data = cobsat_dataset(cfg)
    # Which prompts, how fast they are drawn and what is drawn beside them do not change a prompt's
    # result: the same directory.
    settings = {k: v for k, v in e.__dict__.items()
                if k not in ("aligner", "tasks", "shots", "limit", "nightly_limit", "compile", "baselines")
                and (e.generator == "tbdn" or not k.startswith("tbdn_"))}  # TBDN's settings are its own
    # The VLM (generator and qwen2-vl judge) has the features stage's system prompt (its pixel limits
    # at inference are eval settings).
    vlm_inputs = {"system_prompt": cfg.features.system_prompt}
    # A synthetic set is the same images wherever it lies (its size is in `settings`); a real one is
    # keyed by its directory.
    dataset_key = "synthetic" if e.dataset == "synthetic" else recorded_path(data.root, stage_root(cfg))
    out_dir = stage_root(cfg) / "eval" / fingerprint({
        "schema": EVAL_SCHEMA_VERSION, "eval": settings, "generator": identity, "dataset": dataset_key,
        "features": vlm_inputs, "models": {k: v.__dict__ for k, v in cfg.models.__dict__.items()},
    })
    scorer = built_on_first_call(lambda: clip_scorer(cfg)) if e.clip_score else None
    count = len(set(e.tasks)) * len(set(e.shots)) * harness.prompts_per_task(e.limit)
    with records.monitored_evaluation(out_dir, registry.prompt_set(e.tasks, e.shots, count)):
        if cfg.cluster.engine == "ray":
            units = [(cfg.to_dict(), drawn_with, str(out_dir), t, shot) for shot in e.shots for t in e.tasks]
            cluster.map_on_workers(cfg.cluster, evaluate_cobsat_unit, units, f"cobsat ({label})")
            summary = harness.merge_units(data, out_dir, tasks=e.tasks, shots=e.shots, limit=e.limit,
                                          judge_label=judge.judge_label(cfg))
        else:
            summary = harness.evaluate(data, generator, built_on_first_call(lambda: judge.load_judge(cfg)), out_dir,
                                       tasks=e.tasks, shots=e.shots, limit=e.limit, batch_size=e.batch_size,
                                       name=e.generator, judge_label=judge.judge_label(cfg), clip_scorer=scorer)
    # Logged before the baselines are drawn: a run cut off while drawing them keeps the aligner's.
    run_id = records.log_evaluation(out_dir, summary, ref, label)
    baselines, table = {}, summary.table()
    if e.generator == "thinkdiff" and e.baselines:
        for entry in e.baselines:
            name, _, other_vlm = entry.partition("@")
            models = cfg.models if not other_vlm else dataclasses.replace(
                cfg.models, vlm=dataclasses.replace(cfg.models.vlm, id=other_vlm, revision="main"))
            alone = dataclasses.replace(cfg, models=models, eval=dataclasses.replace(e, generator=name, baselines=[]))
            # hybrid draws with the same aligner; the others need none
            baselines[entry] = evaluate_cobsat(alone, model=model if name in ALIGNER_GENERATORS else None).summary
    result = CobsatEvaluation(table=table, results_dir=out_dir, summary=summary, run_id=run_id,
                              run_url=records.run_url(run_id), model=ref, baselines=baselines)
    if baselines:
        summaries = {"thinkdiff": summary, **baselines}
        # The VLM-backed generators drew with models.vlm or the one their entry names; the sanity baselines with none.
        vlms = {n: n.partition("@")[2] or cfg.models.vlm.id for n in summaries if n not in harness.BASELINES}
        written = harness.compare(out_dir, summaries, vlms)
        records.log_comparison(run_id, [result.comparison_md, result.comparison_png], replace=written)
        result = dataclasses.replace(result, table=result.comparison_md.read_text().rstrip("\n"))
    log.info("CoBSAT (%s): mean accuracy %s over %d prompts; per task in %s", label,
             ", ".join(f"{shot}-shot {m:.3f}" for shot, m in sorted(summary.mean.items())), summary.num_prompts,
             result.comparison_md or result.summary_md)
    return result


def cobsat_dataset(cfg: RunConfig) -> dataset.CobsatDataset:
    """The set `eval.dataset` names; the synthetic one made under paths.root if absent, one set per
    image size (a changed eval.synthetic_image_size draws its own set)."""
    e = cfg.eval
    if e.dataset == "synthetic":
        return dataset.make_synthetic_dataset(stage_root(cfg) / f"cobsat-synthetic-{e.synthetic_image_size}px",
                                              e.synthetic_image_size)
    return dataset.open_dataset(e.dataset)


def evaluate_cobsat_unit(config: dict, aligner: str | None, out_dir: str, task: int, shot: int) -> str:
    """One (task, shot) of `evaluate_cobsat` on a cluster worker (`config`: `RunConfig.to_dict()`,
    `aligner`: the resolved spec the aligner generators draw with). The models are loaded once per
    worker process and kept for its later units (thinkdiff.models.common.shared)."""
    from thinkdiff import generate

    cfg = config_from_dict(config, source="a CoBSAT unit's config")
    e = cfg.eval
    generator = harness.BASELINES.get(e.generator) or generate.build_generator(cfg, aligner)
    results = harness.evaluate_unit(cobsat_dataset(cfg), generator, judge.load_judge(cfg), Path(out_dir), task=task,
                                    shot=shot, limit=e.limit, batch_size=e.batch_size, name=e.generator,
                                    clip_scorer=clip_scorer(cfg) if e.clip_score else None)
    return str(results)


def _checkpoint_vlm(aligner_dir: Path) -> str | None:
    """The `models.vlm.id` recorded by the checkpoint an aligner directory belongs to (its meta.json
    beside it), or None for an aligner that is not a checkpoint's (or the official .pth)."""
    try:
        return json.loads((aligner_dir.parent / META_FILE).read_text())["config"]["models"]["vlm"]["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _refuse_another_vlm(cfg: RunConfig, spec: str, trained_on: str | None) -> None:
    """An aligner maps one VLM's token features: drawing it from another VLM's is refused before any
    model loads (`trained_on`: the VLM of its training run, when recorded). A local directory may hold
    the weights a Hub id names, so only two different names of neither kind are told apart here (the
    widths are checked again when the models load)."""
    if trained_on is None or Path(trained_on).is_dir() or Path(cfg.models.vlm.id).is_dir():
        return
    if trained_on != cfg.models.vlm.id:
        raise DataContractError(f"aligner {spec} was trained on the features of {trained_on}, but models.vlm.id is "
                                f"{cfg.models.vlm.id}: set models.vlm.id={trained_on}, or use an aligner trained for "
                                f"{cfg.models.vlm.id}")


def promotion_decision(candidate_mean: float, champion_mean: float | None, champion: str | None) -> tuple[bool, str]:
    """Whether the candidate becomes champion, and why. The policy: with no champion, the first
    version evaluated becomes it; otherwise only a strictly higher mean accuracy over the same prompts
    (both were drawn on the nightly subset) replaces the champion, so a tie keeps it."""
    if champion_mean is None:
        return True, f"nightly CoBSAT: no champion yet; candidate mean {candidate_mean:.4f} (the first evaluated)"
    better = candidate_mean > champion_mean
    reason = (f"nightly CoBSAT: candidate mean {candidate_mean:.4f} {'>' if better else '<='} champion v{champion} "
              f"mean {champion_mean:.4f} on the same prompts")
    return better, reason if better else reason + " (a tie keeps the champion)"


def evaluate_cobsat_nightly(cfg: RunConfig) -> NightlyEvaluation:
    """Evaluate `@champion`, and `@candidate` when it is a newer version; promote the candidate by
    `promotion_decision` (mean accuracy over the configured shots), recorded on the candidate either way.

    Each model is evaluated on the first `eval.nightly_limit` prompts of every (task, shot); a model
    already evaluated with the same settings is not drawn again (its results directory is reused).
    """
    # Promotion compares the two versions; baselines would cost the night's budget to say nothing new.
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, limit=cfg.eval.nightly_limit, baselines=[]))
    records = registry.Registry(cfg)
    champion = records.current_version(registry.CHAMPION)
    candidate = records.current_version(registry.CANDIDATE)
    if champion is None and candidate is None:  # a fresh store, or a mistyped tracking.registered_model
        log.warning("nightly evaluation: %s has no @%s and no @%s version in %s, nothing to evaluate; register one "
                    "with `thinkdiff registry register`", cfg.tracking.registered_model, registry.CHAMPION,
                    registry.CANDIDATE, records.uri)
    evaluations = {}
    for role, ref in (("champion", champion), ("candidate", candidate)):
        if ref is None or (role == "candidate" and champion is not None and int(ref.version) <= int(champion.version)):
            continue
        evaluations[role] = evaluate_cobsat(cfg, model=ref.uri)
    promoted = None
    if "candidate" in evaluations:
        champion_mean = evaluations["champion"].mean_accuracy if "champion" in evaluations else None
        promote, reason = promotion_decision(evaluations["candidate"].mean_accuracy, champion_mean,
                                             champion and champion.version)
        records.record_promotion_decision(candidate.version, promote, reason)
        if promote:
            promoted = records.promote(candidate.version, reason).version
    result = NightlyEvaluation(champion=champion and champion.version, candidate=candidate and candidate.version,
                               evaluations=evaluations, promoted=promoted)
    log.info("nightly evaluation: %s", result.report())
    return result
