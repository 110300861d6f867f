"""The CoBSAT evaluation harness: prompts -> generator -> judge -> results.jsonl -> summary.

    thinkdiff cobsat eval --config tiny eval.generator=oracle

Per-prompt results are appended to `results.jsonl` as they are judged (a rerun resumes after the
last complete line); the summary gives accuracy per task in the papers' column order and the mean
per shot, generation and judging cost, a per-task bar chart and a grid of samples as PNG.

Generators are callables `(prompts, dataset) -> images` over a fixed batch of prompts of one task
and shot; a batch's rows are appended together. A generator with a VLM returns `Drawing`s, so each
row also keeps what the VLM was given and what it said. Every image is saved as CoBSAT's inference
saves it (JPEG at Pillow's default quality) and the judge reads it back from that file, as CoBSAT's
evaluation does; each row keeps the judge's two raw replies. The sanity baselines need no model and
have exact expected accuracies on a labelled set: oracle 1.0, copy-the-last-demo 0.0, random theta
about 0.1, random about 0.01.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from thinkdiff.eval.cobsat import (
    COLUMN_ORDER,
    ITEMS,
    NUM_PROMPTS,
    Prompt,
    Task,
    Verdict,
    build_prompt,
    cobsat_result_path,
    get_task,
    is_correct,
)
from thinkdiff.eval.dataset import CobsatDataset
from thinkdiff.eval.published import PUBLISHED, published_table
from thinkdiff.plots import plot_cobsat_accuracy, save_sample_grid
from thinkdiff.storage import atomic_write_bytes, atomic_write_image, atomic_write_json, exclusive, read_jsonl

log = logging.getLogger(__name__)

@dataclass
class Drawing:
    """A generated image with what the VLM behind it was given (the rendered chat, one placeholder per
    image) and what it said (its whole answer, special tokens kept)."""

    image: Image.Image
    vlm_prompt: str
    vlm_text: str


Generator = Callable[[list[Prompt], CobsatDataset], "list[Image.Image] | list[Drawing]"]
Judge = Callable[[list[Image.Image], list[Task]], list[Verdict]]
"""The judge's verdict on each image of a batch, given each one's task."""
ClipScorer = Callable[[list[Image.Image], list[Prompt]], list[dict[str, Any]]]
"""CoBSAT's secondary metric (thinkdiff.eval.clip_score): the CLIP fields of each image's row."""
RESULTS = "results.jsonl"
SUMMARY_TABLE, SUMMARY_JSON, ACCURACY_CHART, SAMPLES_GRID = "summary.md", "summary.json", "accuracy.png", "samples.png"


def oracle(prompt: Prompt, dataset: CobsatDataset) -> Image.Image:
    """Draws exactly the expected image (x_query with theta)."""
    return dataset.item(prompt.task, *prompt.expected)


def copy_last_demo(prompt: Prompt, dataset: CobsatDataset) -> Image.Image:
    """Returns the last demo image: its x is wrong by construction."""
    return dataset.item(prompt.task, *prompt.pair(prompt.x_items[-2]))


def random_theta(prompt: Prompt, dataset: CobsatDataset) -> Image.Image:
    """x_query with a theta drawn at random (seeded by the prompt)."""
    rng = random.Random(f"{prompt.task.id}:{prompt.shot}:{prompt.index}")
    theta = rng.choice(ITEMS[prompt.task.theta_space])
    x = prompt.x_items[-1]
    pair = (x, theta) if prompt.task.x_is_attribute else (theta, x)
    return dataset.item(prompt.task, *pair)


def random_image(prompt: Prompt, dataset: CobsatDataset) -> Image.Image:
    rng = random.Random(f"{prompt.task.id}:{prompt.shot}:{prompt.index}")
    return dataset.item(prompt.task, rng.choice(ITEMS[prompt.task.attribute]), rng.choice(ITEMS[prompt.task.object]))


def _per_prompt(draw: Callable[[Prompt, CobsatDataset], Image.Image]) -> Generator:
    return lambda prompts, dataset: [draw(p, dataset) for p in prompts]


BASELINES: dict[str, Generator] = {
    "oracle": _per_prompt(oracle),
    "copy-last": _per_prompt(copy_last_demo),
    "random-theta": _per_prompt(random_theta),
    "random": _per_prompt(random_image),
}


@dataclass
class Summary:
    accuracy: dict[int, dict[int, float]]
    """shot -> task id -> accuracy."""
    mean: dict[int, float]
    num_prompts: int
    gen_images_per_s: float
    gen_s_per_prompt: float
    judge_s_per_prompt: float
    judge: str
    """What judged (thinkdiff.eval.judge.judge_label): whether it is CoBSAT's own judge."""
    clip_accuracy: dict[int, dict[int, float]]
    """shot -> task id -> the mean of CoBSAT's CLIP correctness (empty without eval.clip_score)."""
    clip_similarity: dict[int, dict[int, float]]
    """shot -> task id -> the mean CLIP similarity to the expected "{detail} {object}" (idem)."""

    def table(self) -> str:
        return _table({"": self})


def _table(summaries: dict[str, Summary], vlms: dict[str, str] | None = None) -> str:
    """Accuracy per task in the papers' column order and the mean, a row per shot (per generator
    and shot when the generators are named, with the VLM each drew with when `vlms` names them; a
    `generator@vlm` name shows as its generator, the VLM in its own column),
    then how many prompts it covers and what judged them: a quick check with a small `eval.limit`,
    or another judge than CoBSAT's, must not read as the paper's result. With CoBSAT's CLIP metric,
    its accuracy and similarity follow as a second table."""
    lines = _accuracy_rows(summaries, lambda s: s.accuracy, "{:.3f}", vlms=vlms)
    if any(s.clip_accuracy for s in summaries.values()):
        lines += ["", "CLIP (CoBSAT's secondary metric): CLIP correct, then mean similarity to the expected caption",
                  ""]
        lines += _accuracy_rows(summaries, lambda s: s.clip_accuracy, "{:.3f}", metric="CLIP correct")
        lines += _accuracy_rows(summaries, lambda s: s.clip_similarity, "{:.2f}", metric="CLIP similarity")[2:]
    lines += ["", _covered(summaries)]
    return "\n".join(lines)


def _accuracy_rows(summaries: dict[str, Summary], values: Callable[[Summary], dict[int, dict[int, float]]], number: str,
                   metric: str = "", vlms: dict[str, str] | None = None) -> list[str]:
    named = any(summaries)
    header = (["generator"] * named + ["VLM"] * bool(vlms) + ["metric"] * bool(metric) + ["shot"]
              + [get_task(t).short for t in COLUMN_ORDER] + ["mean"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in summaries.items():
        for shot, per_task in sorted(values(summary).items()):
            cells = [name.partition("@")[0]] * named + ([vlms.get(name, "-")] if vlms else [])
            cells += [metric] * bool(metric) + [str(shot)]
            cells += [number.format(per_task[t]) if t in per_task else "-" for t in COLUMN_ORDER]
            lines.append("| " + " | ".join(cells) + f" | {number.format(sum(per_task.values()) / len(per_task))} |")
    return lines


def _covered(summaries: dict[str, Summary]) -> str:
    counts = sorted({s.num_prompts for s in summaries.values()})
    judges = sorted({s.judge for s in summaries.values()})
    return (f"{'/'.join(map(str, counts))} prompts" + (" per generator" if any(summaries) else "")
            + f"; judge: {', '.join(judges)}")


COMPARISON = ("comparison.md", "comparison.png")


def compare(out_dir: Path, summaries: dict[str, Summary], vlms: dict[str, str] | None = None) -> bool:
    """`comparison.md`: the published results (`thinkdiff.eval.published`) for the shots evaluated,
    then, apart, the measured ones, a row per (generator, VLM, shot); `comparison.png`: the measured
    bars side by side, with the published means beside the measured means, hatched. Rewritten only
    when the table changes; True when they were written."""
    table, chart = (out_dir / name for name in COMPARISON)
    shots = sorted({shot for s in summaries.values() for shot in s.accuracy})
    text = "\n".join([*published_table(shots), "", "Measured here:", "", _table(summaries, vlms)]) + "\n"
    if table.is_file() and chart.is_file() and table.read_text() == text:
        return False
    atomic_write_bytes(table, text.encode())
    plot_cobsat_accuracy({f"{name} {shot}-shot": per_task
                          for name, s in summaries.items() for shot, per_task in sorted(s.accuracy.items())},
                         chart, title=f"CoBSAT accuracy per task, side by side ({_covered(summaries)})",
                         published={f"{p.system} ({p.vlm}) {shot}-shot": p.mean[shot]
                                    for p in PUBLISHED for shot in shots if shot in p.mean})
    return True


def _drawn_prompts(results: Path) -> set[tuple[int, int, int]]:
    """(task, shot, index) of every row in a results file."""
    return {(r["task"], r["shot"], r["index"]) for r in _read_results(results)}


def _read_results(path: Path) -> list[dict]:
    return read_jsonl(path, "delete that line and the evaluation draws its prompt again")


def prompts_per_task(limit: int) -> int:
    """The prompts scored per (task, shot) under `eval.limit` (0: all)."""
    return min(limit or NUM_PROMPTS, NUM_PROMPTS)


def prompt_keys(tasks: list[int], shots: list[int], limit: int | None) -> set[tuple[int, int, int]]:
    """(task, shot, index) of every prompt an evaluation of (tasks x shots) under `limit` scores."""
    count = prompts_per_task(limit)
    return {(t, shot, i) for shot in shots for t in tasks for i in range(count)}


def evaluate(
    dataset: CobsatDataset,
    generator: Generator,
    judge: Judge,
    out_dir: Path,
    *,
    tasks: list[int],
    shots: list[int],
    limit: int | None,
    batch_size: int = 1,
    name: str = "thinkdiff",
    judge_label: str,
    clip_scorer: ClipScorer | None = None,
) -> Summary:
    """Evaluate `generator` on (tasks x shots x prompts[:limit]), resuming from `out_dir/results.jsonl`.

    Images go where CoBSAT's evaluation_icl.py looks for model `name`'s outputs
    (`cobsat_result_path`), so CoBSAT's own code can score `out_dir` as a checkout's results.
    `clip_scorer` adds CoBSAT's CLIP fields to each row.

    Prompts go to the generator in fixed batches: batch k of a (shot, task) holds prompts
    k*batch_size .. (k+1)*batch_size - 1 of its full list, whatever the limit or the run's history
    (a sampling VLM's output depends on its batch). A batch runs when one of its prompts within the
    limit has no result yet; its rows without a result are appended (a batch crossing the limit
    adds a few rows past it, which the summary leaves out). Rows that units of a spread evaluation
    of these prompts left (`evaluate_unit`, cut off before `merge_units`) are taken up first, except
    a unit's that a worker is still drawing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # One writer per results directory (a baseline's is shared by every aligner evaluated with its
    # settings): a second evaluation waits, then finds the prompts drawn.
    with exclusive(out_dir / ".lock", f"cobsat: another evaluation is writing {out_dir}; waiting for it"):
        _merge_unit_files(out_dir, tasks=tasks, shots=shots, wait=False)
        _draw(dataset, generator, judge, out_dir, out_dir / RESULTS, tasks=tasks, shots=shots, limit=limit,
              batch_size=batch_size, name=name, clip_scorer=clip_scorer)
        # Only the prompts asked for: a directory may also hold rows of a run with a larger limit.
        return summarize(out_dir, prompt_keys(tasks, shots, limit), dataset, judge_label)


UNITS_DIR = "units"


def unit_results(out_dir: Path, task: int, shot: int) -> Path:
    """Where the (task, shot) unit of a spread evaluation appends its rows until `merge_units` moves
    them into results.jsonl."""
    return out_dir / UNITS_DIR / f"task{task:02d}-shot{shot}.jsonl"


def evaluate_unit(dataset: CobsatDataset, generator: Generator, judge: Judge, out_dir: Path, *, task: int, shot: int,
                  limit: int | None, batch_size: int = 1, name: str = "thinkdiff",
                  clip_scorer: ClipScorer | None = None) -> Path:
    """One (task, shot) of `evaluate`, drawn beside the other units (on another worker, say) into the
    same directory: the same batches, seeds and image paths, its rows in `unit_results` (resuming
    from them and from results.jsonl); returns that file. `merge_units` then summarizes."""
    results = unit_results(out_dir, task, shot)
    results.parent.mkdir(parents=True, exist_ok=True)
    # The rows' own file is the lock: nothing is left beside them once merged.
    with exclusive(results, f"cobsat: another worker is drawing task {task}, {shot} shots in {out_dir}; waiting"):
        _draw(dataset, generator, judge, out_dir, results, tasks=[task], shots=[shot], limit=limit,
              batch_size=batch_size, name=name, clip_scorer=clip_scorer)
    return results


def merge_units(dataset: CobsatDataset, out_dir: Path, *, tasks: list[int], shots: list[int], limit: int | None,
                judge_label: str) -> Summary:
    """Append the units' rows to results.jsonl in the order `evaluate` writes them (shot, then task),
    remove the unit files, and summarize as `evaluate` does. A merge cut off is merged again: rows
    already in results.jsonl are not appended twice."""
    with exclusive(out_dir / ".lock", f"cobsat: another evaluation is writing {out_dir}; waiting for it"):
        _merge_unit_files(out_dir, tasks=tasks, shots=shots, wait=True)
        with contextlib.suppress(OSError):  # units of other prompt sets still there
            (out_dir / UNITS_DIR).rmdir()
        return summarize(out_dir, prompt_keys(tasks, shots, limit), dataset, judge_label)


def _merge_unit_files(out_dir: Path, *, tasks: list[int], shots: list[int], wait: bool) -> None:
    """Append the rows of the (tasks x shots) units' files to results.jsonl, in `evaluate`'s order
    (shot, then task) and never twice, removing each file once its rows are in. A unit a worker is
    drawing is waited for, or with `wait=False` left to it. The caller holds the directory's lock."""
    done, merged = _drawn_prompts(out_dir / RESULTS), 0
    for unit in (unit_results(out_dir, t, shot) for shot in shots for t in tasks):
        if not unit.is_file():
            continue
        with exclusive(unit, f"cobsat: a worker is drawing {unit.name}; waiting for it", wait=wait) as held:
            if held is None:
                continue
            rows = {(r["task"], r["shot"], r["index"]): r for r in _read_results(unit)}
            new = [row for key, row in rows.items() if key not in done]
            with open(out_dir / RESULTS, "a") as fh:
                fh.write("".join(json.dumps(row) + "\n" for row in new))
            done |= rows.keys()
            merged += len(new)
            unit.unlink()
    if merged:
        log.info("cobsat: %d rows of spread units merged into %s", merged, out_dir / RESULTS)


def _draw(dataset: CobsatDataset, generator: Generator, judge: Judge, out_dir: Path, results_path: Path, *,
          tasks: list[int], shots: list[int], limit: int | None, batch_size: int, name: str,
          clip_scorer: ClipScorer | None) -> None:
    """Draw and judge the batches with a prompt lacking a row in `results_path` (or in results.jsonl),
    appending their rows to `results_path`. The caller holds that file's lock."""
    done = _drawn_prompts(results_path)
    if results_path != out_dir / RESULTS:
        done |= _drawn_prompts(out_dir / RESULTS)
    batches: list[list[Prompt]] = []
    count = prompts_per_task(limit)
    for shot in shots:
        for t in tasks:
            for start in range(0, count, batch_size):
                if any((t, shot, i) not in done for i in range(start, min(start + batch_size, count))):
                    batches.append([build_prompt(get_task(t), shot, i)
                                    for i in range(start, min(start + batch_size, NUM_PROMPTS))])
    total = sum(len(b) for b in batches)
    log.info("cobsat: %d prompts to evaluate in %d batches (%d already in %s)", total, len(batches), len(done),
             results_path)
    every = max(1, len(batches) // 20)
    started_all = time.perf_counter()
    finished = 0
    with open(results_path, "a") as fh, tqdm(total=total, desc="cobsat", unit="prompt", disable=None) as progress:
        for n, batch in enumerate(batches, start=1):
            started = time.perf_counter()
            drawn = generator(batch, dataset)
            gen_s = (time.perf_counter() - started) / len(batch)
            # A partly written batch: its earlier rows stay as they are.
            new = [(p, d) for p, d in zip(batch, drawn, strict=True) if (p.task.id, p.shot, p.index) not in done]
            saved = [_save_image(out_dir, cobsat_result_path(p, name), d.image if isinstance(d, Drawing) else d)
                     for p, d in new]
            judge_started = time.perf_counter()
            reread = [_reopen(out_dir / rel) for rel in saved]
            verdicts = judge(reread, [p.task for p, _ in new])
            judge_s = (time.perf_counter() - judge_started) / max(len(new), 1)
            rows = [_row(prompt, drawing, rel, verdict, gen_s=gen_s, judge_s=judge_s)
                    for (prompt, drawing), rel, verdict in zip(new, saved, verdicts, strict=True)]
            if clip_scorer is not None and rows:
                for row, fields in zip(rows, clip_scorer(reread, [p for p, _ in new]), strict=True):
                    row.update(fields)
            fh.write("".join(json.dumps(row) + "\n" for row in rows))
            fh.flush()
            finished += len(batch)
            progress.update(len(batch))
            if n % every == 0 or n == len(batches):
                rate = finished / (time.perf_counter() - started_all)
                log.info("cobsat: %d/%d prompts, %.2f prompts/s, ETA %.0fs", finished, total, rate,
                         (total - finished) / rate)


def _save_image(out_dir: Path, rel: str, image: Image.Image) -> str:
    """Writes `image` at `out_dir/rel` as CoBSAT's inference_icl.py saves its outputs
    (`img.save(path + '.jpg')`: JPEG at Pillow's default quality, 75); returns `rel`."""
    atomic_write_image(out_dir / rel, image.convert("RGB"))
    return rel


def _reopen(path: Path) -> Image.Image:
    """The saved image as the judge reads it: decoded again from the JPEG file."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _row(prompt: Prompt, drawing: Image.Image | Drawing, rel: str, verdict: Verdict,
         **timings: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "task": prompt.task.id, "shot": prompt.shot, "index": prompt.index,
        "detail": verdict.detail, "object": verdict.object,
        "correct": is_correct(prompt.task, prompt, verdict.detail, verdict.object),
        "image": rel, "judge_replies": list(verdict.replies), **timings,
    }
    if isinstance(drawing, Drawing):
        row.update(vlm_prompt=drawing.vlm_prompt, vlm_text=drawing.vlm_text)
    return row


def summarize(out_dir: Path, keys: set[tuple[int, int, int]], dataset: CobsatDataset, judge_label: str) -> Summary:
    """Accuracy per (shot, task) over the results.jsonl rows of `keys` (task, shot, index); writes
    summary.json, summary.md, a bar chart and the sample grid of those rows (a directory holds the
    rows of every prompt set evaluated in it)."""
    first: dict[tuple[int, int, int], dict] = {}
    for r in _read_results(out_dir / RESULTS):  # a prompt written twice (writers without the lock) counts once
        first.setdefault((r["task"], r["shot"], r["index"]), r)
    rows = [r for key, r in first.items() if key in keys]
    accuracy = _mean_per_shot_and_task(rows, "correct")
    mean = {shot: sum(v.values()) / len(v) for shot, v in accuracy.items()}
    gen_s = sum(r["gen_s"] for r in rows)
    summary = Summary(
        accuracy=accuracy,
        mean=mean,
        num_prompts=len(rows),
        gen_images_per_s=len(rows) / gen_s if gen_s else 0.0,
        gen_s_per_prompt=gen_s / max(len(rows), 1),
        judge_s_per_prompt=sum(r["judge_s"] for r in rows) / max(len(rows), 1),
        judge=judge_label,
        clip_accuracy=_mean_per_shot_and_task(rows, "clip_correct"),
        clip_similarity=_mean_per_shot_and_task(rows, "clip_similarity"),
    )
    previous = out_dir / SUMMARY_JSON
    table = out_dir / SUMMARY_TABLE
    current = (table.is_file() and table.read_text() == summary.table() + "\n" and (out_dir / ACCURACY_CHART).is_file()
               and (out_dir / SAMPLES_GRID).is_file() and previous.is_file()
               and json.loads(previous.read_text()) == json.loads(json.dumps(summary.__dict__)))
    if current:
        return summary  # a rerun with nothing new rewrites nothing
    atomic_write_json(out_dir / SUMMARY_JSON, summary.__dict__)
    atomic_write_bytes(out_dir / SUMMARY_TABLE, (summary.table() + "\n").encode())
    plot_cobsat_accuracy({f"{shot}-shot": per_task for shot, per_task in sorted(summary.accuracy.items())},
                         out_dir / ACCURACY_CHART, title=f"CoBSAT accuracy per task ({summary.num_prompts} prompts)")
    save_samples(out_dir, dataset, rows)
    return summary


def _mean_per_shot_and_task(rows: list[dict], field: str) -> dict[int, dict[int, float]]:
    """shot -> task -> the mean of `field` over the rows that have it (booleans count 1 and 0)."""
    by_key: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if field in r:
            by_key.setdefault((r["shot"], r["task"]), []).append(float(r[field]))
    means: dict[int, dict[int, float]] = {}
    for (shot, task), values in sorted(by_key.items()):
        means.setdefault(shot, {})[task] = sum(values) / len(values)
    return means


def save_samples(out_dir: Path, dataset: CobsatDataset, rows: list[dict], per_shot: int = 4) -> Path:
    """A PNG grid: for the first of `rows` (results.jsonl rows) of each shot, the demo images then
    the generated image, under the prompt and, for a generator with a VLM, the start of what it said."""
    picked = []
    for shot in sorted({r["shot"] for r in rows}):
        picked += [r for r in rows if r["shot"] == shot][:per_shot]
    grid = []
    for r in picked:
        prompt = build_prompt(get_task(r["task"]), r["shot"], r["index"])
        demos = [dataset.image(p) for p in prompt.image_inputs]
        text = " ".join(prompt.text_inputs)
        verdict = "correct" if r["correct"] else "wrong"
        said = r.get("vlm_text")
        caption = f"{prompt.task.short} {text}-> {'/'.join(prompt.expected)}: {verdict}"
        grid.append((demos + [Image.open(out_dir / r["image"])],
                     caption + (f"\nVLM: {' '.join(said.split())}" if said else "")))
    return save_sample_grid(grid, out_dir / SAMPLES_GRID)
