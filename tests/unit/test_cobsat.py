"""Covers: the CoBSAT protocol (item order, display words, seed-123 permutation lists, theta at
position shot+1, texts, image paths, expected items, save names), the exact judge questions and
answer parsing, the real-layout reader's error, the synthetic set and its judge (>= 99.5% per
factor on clean renders), and the sanity baselines' exact accuracies (oracle 1.0, copy-last 0.0),
with resumable results, the summary table and its pictures."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

from thinkdiff.cli import main
from thinkdiff.config import load_config
from thinkdiff.errors import DataContractError
from thinkdiff.eval import harness, stage
from thinkdiff.eval.cobsat import (
    ITEMS,
    TASKS,
    build_prompt,
    cobsat_result_path,
    get_task,
    is_correct,
    judge_questions,
    parse_answer,
    prompt_lists,
)
from thinkdiff.eval.dataset import all_item_paths, make_synthetic_dataset, open_dataset, read_factors
from thinkdiff.eval.harness import BASELINES, compare, evaluate
from thinkdiff.eval.judge import synthetic_judge

SYNTHETIC = "synthetic reader (not CoBSAT's judge)"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("cobsat"))


def test_prompt_lists_match_the_protocol():
    pairs = prompt_lists()
    assert len(pairs) == 1000
    assert pairs[0] == ((8, 7, 5, 9, 2, 3, 6, 1, 4, 0), (7, 6, 3, 4, 1, 0, 2, 5, 9, 8))
    assert all(sorted(x) == list(range(10)) and sorted(t) == list(range(10)) for x, t in pairs)


def test_official_example_prompt():
    prompt = build_prompt(get_task(1), shot=2, index=0)
    assert prompt.text_inputs == ["blue: ", "brown: ", "orange: "]
    assert prompt.image_inputs == ["datasets/color_car/blue_car.jpg", "datasets/color_car/brown_car.jpg"]
    assert prompt.expected == ("orange", "car") and prompt.theta == "car"
    assert prompt.save_name == "0_car_blue_brown_orange"
    # 4-shot prompt 0 uses theta_list[5] = 0: another object.
    four = build_prompt(get_task(1), shot=4, index=0)
    assert four.theta == "leaf" and four.text_inputs[-1] == "red: " and len(four.image_inputs) == 4


def test_task_ii_and_display_words():
    prompt = build_prompt(get_task("Style-II"), shot=2, index=0)
    # x is the object, theta the style: theta_list[3] = 4 -> lego.
    assert prompt.text_inputs == ["bag: ", "ball: ", "box: "]
    assert prompt.image_inputs[0] == "datasets/style_bag/lego_bag.jpg"
    assert prompt.expected == ("lego", "box")
    wire = next(build_prompt(get_task(5), 2, i) for i in range(1000) if "3d" in build_prompt(get_task(5), 2, i).x_items)
    assert "wireframe: " in wire.text_inputs
    park = next(build_prompt(get_task(3), 2, i) for i in range(1000)
                if "park" in build_prompt(get_task(3), 2, i).x_items)
    assert "amusement park: " in park.text_inputs


def test_save_names_and_paths_as_cobsat_writes_them():
    # CoBSAT's load_dataset.py: f"{i}_{theta}_{'_'.join(x_list)}", theta as its file id, the x items
    # mapped to display words; the image under results/exps/{model}_image/shot_{N}/{prompt_type}/task_{id}.
    words = {"3d": "wireframe", "park": "amusement park"}
    cases = (("Style-I", 0, "0_car_wireframe_futuristic_icon"),      # x item 3d
             ("Background-II", 0, "0_park_cat_cow_lion"),            # theta park: the file id
             ("Background-I", 1, "1_tiger_space_amusement park_volcano"))  # x item park: a space in the name
    for task_name, index, name in cases:
        task = get_task(task_name)
        x_list, theta_list = prompt_lists()[index]
        theta = ITEMS[task.theta_space][theta_list[2 + 1]]
        x_words = [words.get(ITEMS[task.x_space][k], ITEMS[task.x_space][k]) for k in x_list[:2 + 1]]
        assert f"{index}_{theta}_{'_'.join(x_words)}" == name
        prompt = build_prompt(task, shot=2, index=index)
        assert prompt.save_name == name
        assert cobsat_result_path(prompt, "thinkdiff") == (
            f"results/exps/thinkdiff_image/shot_2/default/task_{task.id}/{name}.jpg")
    with pytest.raises(ValueError, match="folder-safe"):
        cobsat_result_path(build_prompt(get_task(1), 2, 0), "runs/thinkdiff")


def test_prompts_command_prints_json_lines(capsys):
    assert main(["cobsat", "prompts", "--task", "1", "--shot", "2", "--limit", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    assert lines[0] == {
        "index": 0, "task": 1, "shot": 2, "theta": "car", "text_inputs": ["blue: ", "brown: ", "orange: "],
        "image_inputs": ["datasets/color_car/blue_car.jpg", "datasets/color_car/brown_car.jpg"],
        "expected_detail": "orange", "expected_object": "car",
    }
    for limit in ("0", "-1", "1001"):  # 0 printed all 1000, -1 none
        assert main(["cobsat", "prompts", "--task", "1", "--shot", "2", "--limit", limit]) == 2
        assert f"limit={limit}: give a prompt count in 1..1000" in capsys.readouterr().err


def test_judge_questions_are_exact():
    detail, obj = judge_questions(get_task(1))
    assert detail == (
        "What is the color (of the main object) in this image? Answer from the following options:  (1)yellow "
        "(2)white (3)red (4)purple (5)pink (6)orange (7)green (8)brown (9)blue (10)black. Answer the number only "
        "and do not include any other texts (e.g., 1)."
    )
    assert obj.startswith("What is the main object in this image? Answer from the following options:  (1)leaf (2)hat")
    assert "(9)wireframe" in judge_questions(get_task(5))[0]
    assert "(1)zebra" in judge_questions(get_task(3))[1] and "(5)amusement park" in judge_questions(get_task(3))[0]


@pytest.mark.parametrize(("reply", "option"),
                         [("3", 3), ("(10)", 10), ("The answer is 1 0", 10), ("0", -1), ("11", -1), ("none", -1)])
def test_answer_parsing_concatenates_digits(reply, option):
    assert parse_answer(reply) == option


def test_correct_only_if_both():
    task, prompt = get_task(1), build_prompt(get_task(1), 2, 0)
    orange, car = ITEMS["color"].index("orange") + 1, ITEMS["object"].index("car") + 1
    assert is_correct(task, prompt, orange, car)
    assert not is_correct(task, prompt, orange, car + 1) and not is_correct(task, prompt, -1, car)


def test_real_layout_reader_names_missing_files(tmp_path):
    (tmp_path / "datasets" / "color_car").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"500 of 500 CoBSAT images missing.*yzeng58/CoBSAT"):
        open_dataset(tmp_path)


def test_synthetic_set_layout_and_judge_accuracy(synthetic):
    assert len(all_item_paths()) == 500 and all((synthetic.root / p).is_file() for p in all_item_paths())
    assert (synthetic.root / "color_object.csv").read_text().startswith("image,caption\n")
    for task in TASKS[::2]:  # the five themes
        detail_ok = object_ok = total = 0
        for obj in ITEMS[task.object]:
            for attribute in ITEMS[task.attribute]:
                d, o = read_factors(synthetic.item(task, attribute, obj), task)
                detail_ok += d == ITEMS[task.attribute].index(attribute) + 1
                object_ok += o == ITEMS[task.object].index(obj) + 1
                total += 1
        assert detail_ok / total >= 0.995 and object_ok / total >= 0.995


def test_a_synthetic_set_is_never_extended_at_another_size(tmp_path):
    """A set drawn at one size (complete, or interrupted before its marker) is not completed or
    reused at another: its images would mix sizes, or the evaluation would read the old ones."""
    root = tmp_path / "set"
    make_synthetic_dataset(root, 32)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    with pytest.raises(DataContractError,
                       match=rf"{root} holds the synthetic CoBSAT set at 32 px, not 40: give another directory"):
        make_synthetic_dataset(root, 40)
    (root / "SYNTHETIC.txt").unlink()  # as an interrupted run leaves it
    with pytest.raises(DataContractError, match="at 32 px, not 40"):
        make_synthetic_dataset(root, 40)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == {
        p: t for p, t in stamps.items() if p.name != "SYNTHETIC.txt"}
    assert make_synthetic_dataset(root, 32).image(all_item_paths()[0]).size == (32, 32)  # its own size completes it
    with pytest.raises(NotADirectoryError, match="is a file: give a directory"):
        make_synthetic_dataset(root / "color_object.csv", 32)
    with pytest.raises(ValueError, match=r"image size 0: use at least 32 \(--size, eval.synthetic_image_size\)"):
        make_synthetic_dataset(tmp_path / "empty", 0)
    assert not (tmp_path / "empty").exists()


def test_sanity_baselines_exact_on_synthetic(synthetic, tmp_path):
    tasks = [t.id for t in TASKS]
    oracle = evaluate(synthetic, BASELINES["oracle"], synthetic_judge, tmp_path / "oracle", judge_label=SYNTHETIC,
                      tasks=tasks, shots=[2, 4], limit=5)
    copy = evaluate(synthetic, BASELINES["copy-last"], synthetic_judge, tmp_path / "copy", judge_label=SYNTHETIC,
                    tasks=tasks, shots=[2, 4], limit=5)
    assert oracle.mean == {2: 1.0, 4: 1.0} and all(v == 1.0 for per in oracle.accuracy.values() for v in per.values())
    assert copy.mean == {2: 0.0, 4: 0.0}
    assert oracle.num_prompts == 100 and "| shot | C-I | B-I | S-I | A-I | T-I | C-II |" in oracle.table()
    assert oracle.table().endswith(f"|\n\n100 prompts; judge: {SYNTHETIC}")
    assert (tmp_path / "oracle" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_random_baselines_are_near_chance(synthetic, tmp_path):
    tasks = [t.id for t in TASKS]
    theta = evaluate(synthetic, BASELINES["random-theta"], synthetic_judge, tmp_path / "theta", judge_label=SYNTHETIC,
                     tasks=tasks, shots=[2], limit=40)
    assert 0.03 <= theta.mean[2] <= 0.2  # about 1/10
    uniform = evaluate(synthetic, BASELINES["random"], synthetic_judge, tmp_path / "random", judge_label=SYNTHETIC,
                       tasks=tasks, shots=[2], limit=40)
    assert uniform.mean[2] <= 0.04 < theta.mean[2]  # about 1/100: both factors drawn at random


def test_results_resume_after_a_torn_line(synthetic, tmp_path):
    out = tmp_path / "run"
    evaluate(synthetic, BASELINES["oracle"], synthetic_judge, out, judge_label=SYNTHETIC, tasks=[1], shots=[2], limit=3)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # killed mid-write
    summary = evaluate(synthetic, BASELINES["oracle"], synthetic_judge, out, judge_label=SYNTHETIC,
                       tasks=[1], shots=[2], limit=3)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and summary.num_prompts == 3
    # A last row whole but cut before its newline: the next row starts a line of its own.
    (out / "results.jsonl").write_text((out / "results.jsonl").read_text().rstrip("\n"))
    evaluate(synthetic, BASELINES["oracle"], synthetic_judge, out, judge_label=SYNTHETIC, tasks=[1], shots=[2], limit=4)
    assert [json.loads(line)["index"] for line in (out / "results.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    # A damaged line elsewhere is not a torn write: named, and the file left as it is.
    lines = (out / "results.jsonl").read_text().splitlines()
    damaged = "\n".join([lines[0], lines[1][:10], lines[2]]) + "\n"
    (out / "results.jsonl").write_text(damaged)
    with pytest.raises(DataContractError, match=r"results.jsonl, line 2: not a JSON line .*delete that line"):
        evaluate(synthetic, BASELINES["oracle"], synthetic_judge, out, judge_label=SYNTHETIC,
                 tasks=[1], shots=[2], limit=3)
    assert (out / "results.jsonl").read_text() == damaged


def test_a_directory_shared_by_prompt_sets_shows_each_its_own_samples(synthetic, tmp_path, monkeypatch):
    """Results of two task sets share a directory; each evaluation's sample grid shows its own
    prompts, and a rerun with nothing new draws no grid."""
    grids = []
    real = harness.save_sample_grid
    monkeypatch.setattr(harness, "save_sample_grid",
                        lambda rows, path: grids.append([c for _, c in rows]) or real(rows, path))
    out = tmp_path / "run"
    evaluate(synthetic, BASELINES["oracle"], synthetic_judge, out, judge_label=SYNTHETIC, tasks=[1], shots=[2], limit=4)
    evaluate(synthetic, BASELINES["oracle"], synthetic_judge, out, judge_label=SYNTHETIC, tasks=[4], shots=[2], limit=2)
    assert len(grids) == 2 and len(grids[0]) == 4 and len(grids[1]) == 2
    assert all(c.startswith("C-I ") for c in grids[0]) and all(c.startswith(f"{get_task(4).short} ") for c in grids[1])
    evaluate(synthetic, BASELINES["oracle"], synthetic_judge, out, judge_label=SYNTHETIC, tasks=[4], shots=[2], limit=2)
    assert len(grids) == 2


def test_prompts_go_in_fixed_batches_of_one_task_and_shot(synthetic, tmp_path):
    """Batch k holds prompts 2k, 2k+1 of one (task, shot), whatever the limit or what ran before:
    a run with limit 3 and then one with limit 5 draw the batches a single limit-5 run draws."""
    def recording(seen):
        def oracle_batch(prompts, dataset):
            seen.append([(p.task.id, p.shot, p.index) for p in prompts])
            return BASELINES["oracle"](prompts, dataset)
        return oracle_batch

    fresh: list = []
    summary = evaluate(synthetic, recording(fresh), synthetic_judge, tmp_path / "fresh", judge_label=SYNTHETIC,
                       tasks=[1, 2], shots=[2, 4], limit=5, batch_size=2)
    assert [[i for _, _, i in b] for b in fresh] == [[0, 1], [2, 3], [4, 5]] * 4
    assert all(len({(t, s) for t, s, _ in b}) == 1 for b in fresh)
    assert summary.num_prompts == 20 and summary.mean == {2: 1.0, 4: 1.0}  # row 5 (past the limit) left out
    rows = [json.loads(line) for line in (tmp_path / "fresh" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["shot"], r["index"]) for r in rows) == sorted(k for b in fresh for k in b)

    staged: list = []
    evaluate(synthetic, recording(staged), synthetic_judge, tmp_path / "staged", judge_label=SYNTHETIC,
             tasks=[1, 2], shots=[2, 4], limit=3, batch_size=2)
    evaluate(synthetic, recording(staged), synthetic_judge, tmp_path / "staged", judge_label=SYNTHETIC,
             tasks=[1, 2], shots=[2, 4], limit=5, batch_size=2)
    assert sorted(staged) == sorted(fresh)


def test_a_smaller_limit_scores_only_its_own_prompts(synthetic, tmp_path):
    """The nightly subset reuses a directory that may hold a full run: its summary covers only the
    prompts it asked for, and nothing is drawn again."""
    calls = []

    def good_then_bad(prompts, dataset):
        calls.append(len(prompts))
        return [BASELINES["oracle" if p.index < 2 else "copy-last"]([p], dataset)[0] for p in prompts]

    full = evaluate(synthetic, good_then_bad, synthetic_judge, tmp_path / "run", judge_label=SYNTHETIC,
                    tasks=[1], shots=[2], limit=5)
    assert full.num_prompts == 5 and full.mean == {2: 0.4}
    calls.clear()
    subset = evaluate(synthetic, good_then_bad, synthetic_judge, tmp_path / "run", judge_label=SYNTHETIC,
                      tasks=[1], shots=[2], limit=2)
    assert subset.num_prompts == 2 and subset.mean == {2: 1.0} and calls == []
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_prompts"] == 2  # what MLflow gets


def test_results_directory_follows_what_changes_a_result(tmp_path):
    """The VLM's image size and system prompt change the pictures: a new results directory. The
    prompt limit does not: the same directory, so a larger run reuses the drawn prompts."""
    def run(*overrides):
        cfg = load_config("tiny", [f"paths.root={tmp_path}", "eval.generator=oracle", "eval.tasks=[1]",
                                   "eval.shots=[2]", *overrides])
        return stage.evaluate_cobsat(cfg)

    base = run("eval.limit=1")
    assert run("eval.limit=2").results_dir == base.results_dir
    assert run("eval.limit=1", "eval.max_pixels=6272").results_dir != base.results_dir
    assert run("eval.limit=1", "features.system_prompt=You are terse.").results_dir != base.results_dir


def test_comparison_shows_generators_side_by_side_and_is_not_rewritten(synthetic, tmp_path):
    run = lambda name: evaluate(synthetic, BASELINES[name], synthetic_judge, tmp_path / name,  # noqa: E731
                                judge_label=SYNTHETIC, tasks=[1, 2], shots=[2, 4], limit=2)
    assert compare(tmp_path / "oracle", {"oracle": run("oracle"), "copy-last": run("copy-last")})
    table = tmp_path / "oracle" / "comparison.md"
    published, measured = table.read_text().split("Measured here:\n\n")
    assert "| TBDN | Qwen2-VL-7B | 4 | 0.767 |" in published and "| TBDN |" not in measured
    lines = measured.splitlines()
    assert lines[0].startswith("| generator | shot | C-I | B-I |")
    assert [line.split(" | ")[:2] for line in lines[2:6]] == [
        ["| oracle", "2"], ["| oracle", "4"], ["| copy-last", "2"], ["| copy-last", "4"]]
    assert lines[6:] == ["", f"8 prompts per generator; judge: {SYNTHETIC}"]  # 2 tasks x 2 shots x 2
    # tasks 1 and 2, then the mean
    scored = [[c for c in line.strip("| ").split(" | ")[2:] if c != "-"] for line in lines[2:6]]
    assert scored == [["1.000"] * 3] * 2 + [["0.000"] * 3] * 2
    chart = tmp_path / "oracle" / "comparison.png"
    assert chart.read_bytes()[:4] == b"\x89PNG"
    stamps = (table.stat().st_mtime_ns, chart.stat().st_mtime_ns)
    assert not compare(tmp_path / "oracle", {"oracle": run("oracle"), "copy-last": run("copy-last")})
    assert (table.stat().st_mtime_ns, chart.stat().st_mtime_ns) == stamps


def test_two_evaluations_of_one_directory_draw_each_prompt_once(synthetic, tmp_path):
    """Two flows evaluating the same settings at once (a shared baseline directory): the second
    waits for the first, then finds every prompt drawn."""
    calls = []

    def slow_oracle(prompts, dataset):
        calls.append([p.index for p in prompts])
        time.sleep(0.3)  # long enough for the other thread to arrive while this one writes
        return BASELINES["oracle"](prompts, dataset)

    def run():
        return evaluate(synthetic, slow_oracle, synthetic_judge, tmp_path / "shared", judge_label=SYNTHETIC,
                        tasks=[1], shots=[2], limit=4, batch_size=2)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        summaries = [f.result() for f in [pool.submit(run), pool.submit(run)]]
    assert sorted(calls) == [[0, 1], [2, 3]]
    rows = [json.loads(line) for line in (tmp_path / "shared" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    assert [s.num_prompts for s in summaries] == [4, 4] and all(s.mean == {2: 1.0} for s in summaries)


def test_a_summary_table_in_an_older_form_is_rewritten_once(synthetic, tmp_path):
    run = lambda: evaluate(synthetic, BASELINES["oracle"], synthetic_judge, tmp_path / "run",  # noqa: E731
                           judge_label=SYNTHETIC, tasks=[1], shots=[2], limit=2)
    summary = run()
    table = tmp_path / "run" / "summary.md"
    table.write_text(summary.table().rsplit("\n\n", 1)[0] + "\n")  # as written before tables gave their prompt count
    run()
    assert (table.read_text() == summary.table() + "\n"
            and table.read_text().endswith(f"\n2 prompts; judge: {SYNTHETIC}\n"))
    stamp = table.stat().st_mtime_ns
    run()
    assert table.stat().st_mtime_ns == stamp


def test_clip_score_is_a_second_table_and_row_fields(tmp_path):
    """eval.clip_score: every row carries CoBSAT's CLIP fields, the summary averages CLIP correctness
    and similarity per task and shot in a second table, and the images lie in CoBSAT's layout."""
    from thinkdiff.eval.clip_score import FIELDS

    cfg = load_config("tiny", [f"paths.root={tmp_path}", "eval.generator=oracle", "eval.baselines=[]",
                               "eval.clip_score=true", "eval.limit=2", "eval.batch_size=2", "eval.tasks=[1, 4]",
                               "eval.shots=[2]"])
    result = stage.evaluate_cobsat(cfg)
    rows = [json.loads(line) for line in result.results_jsonl.read_text().splitlines()]
    assert len(rows) == 4 and all(set(FIELDS) <= set(row) for row in rows)
    assert all(row["image"] == cobsat_result_path(build_prompt(get_task(row["task"]), 2, row["index"]), "oracle")
               for row in rows)
    summary = result.summary
    for task in (1, 4):
        mine = [r for r in rows if r["task"] == task]
        assert summary.clip_accuracy[2][task] == sum(r["clip_correct"] for r in mine) / 2
        assert summary.clip_similarity[2][task] == pytest.approx(sum(r["clip_similarity"] for r in mine) / 2)
    table = result.summary_md.read_text()
    assert "| CLIP correct | 2 |" in table and "| CLIP similarity | 2 |" in table
    # Off (the presets' default): no CLIP fields and no second table.
    plain = stage.evaluate_cobsat(load_config("tiny", [f"paths.root={tmp_path}", "eval.generator=oracle",
                                                       "eval.baselines=[]", "eval.limit=1", "eval.tasks=[1]",
                                                       "eval.shots=[2]"]))
    assert "clip_correct" not in plain.results_jsonl.read_text() and "CLIP" not in plain.table
