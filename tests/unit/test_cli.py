"""Covers: `thinkdiff --help` lists the commands, each (command, action) has one handler; `config`
prints the resolved config; bad input exits with code 2 and a message naming the key, not a
traceback, from `thinkdiff` and from the flows' `python -m flows.X` alike."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import yaml

from thinkdiff.cli import HANDLERS, build_parser, main, parse_command_line


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "thinkdiff", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("corpus", "features", "train", "config", "aligner"):
        assert command in out


def test_every_command_and_action_has_one_handler():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    wanted = set()
    for command, sub in commands.items():
        actions = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        wanted |= {(command, action) for action in actions[0].choices} if actions else {(command, None)}
    assert set(HANDLERS) == wanted


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--config", "tiny", "train.lr=2e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 2e-4 and printed["preset"] == "tiny"


def test_overrides_may_follow_the_options(capsys):
    """`... --corpus DIR features.seed=1`: argparse alone refused the override after the option."""
    args = parse_command_line(["features", "--config", "tiny", "paths.root=/x", "--corpus", "/c", "features.seed=1"])
    assert (args.overrides, str(args.corpus)) == (["paths.root=/x", "features.seed=1"], "/c")
    with pytest.raises(SystemExit) as exit_:
        parse_command_line(["features", "--config", "tiny", "--corpus", "/c", "--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_bad_override_is_exit_2_with_named_key(capsys):
    assert main(["config", "--config", "tiny", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key `train.lrr`; did you mean `train.lr`?" in err and "Traceback" not in err


def test_train_without_features_names_the_fix(capsys, tmp_path):
    assert main(["train", "--config", "tiny", f"paths.root={tmp_path}"]) == 2
    assert "run `thinkdiff features`" in capsys.readouterr().err


def test_train_refuses_a_held_run_directory_unless_told_to_wait():
    """`--wait`: wait for another training of the same run directory (tests/unit/test_train.py runs both)."""
    assert parse_command_line(["train", "--config", "tiny", "--wait", "train.lr=2e-4"]).wait
    assert not parse_command_line(["train", "--config", "tiny"]).wait


def test_flow_command_line_refuses_a_bad_override_before_starting_prefect(tmp_path):
    # Overrides on both sides of --config are all read (the mistyped one comes after it).
    run = subprocess.run([sys.executable, "-m", "flows.pipeline", f"paths.root={tmp_path}", "--config", "tiny",
                          "train.max_stpes=5"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "python -m flows.pipeline: error: override 'train.max_stpes=5': unknown key `train.max_stpes`; "
        "did you mean `train.max_steps`?"]
    # No Prefect server started (its database would be in PREFECT_HOME), no stage begun.
    assert not list((tmp_path / "prefect").rglob("*.db")) and [p.name for p in tmp_path.iterdir()] in ([], ["prefect"])


def test_unreadable_input_images_are_named_before_any_model_loads(capsys, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    assert main(["generate", "--config", "tiny", "--text", "red: ", "--image", str(not_an_image),
                 "--out", str(tmp_path / "o.png")]) == 2
    assert f"--image {not_an_image}: not an image Pillow can read" in capsys.readouterr().err
    assert main(["compose", "--config", "tiny-clip", "--image", str(tmp_path / "missing.jpg"),
                 "--out", str(tmp_path / "o.png")]) == 2
    assert f"--image {tmp_path / 'missing.jpg'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_config_and_its_errors_answer_without_loading_torch():
    code = ("import sys\nfrom thinkdiff.cli import main, parse_command_line\n"
            "assert main(['config', '--config', 'tiny']) == 0 "
            "and main(['config', '--config', 'tiny', 'train.lrr=1']) == 2\n"
            "assert 'torch' not in sys.modules, 'config imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_a_missing_aligner_is_named_before_an_evaluation_starts(capsys, tmp_path):
    missing = tmp_path / "no-such-aligner"
    assert main(["cobsat", "eval", "--config", "tiny", f"paths.root={tmp_path / 'root'}", "--model", str(missing)]) == 2
    assert f"aligner {missing} (--model / --aligner): no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()  # no results file, no synthetic set, nothing begun
    # An aligner named for a generator that draws without one was ignored; now it is refused.
    assert main(["cobsat", "eval", "--config", "tiny", f"paths.root={tmp_path / 'root'}", "eval.generator=copy-last",
                 "--model", str(missing)]) == 2
    assert "eval.generator=copy-last draws without one: set eval.generator=thinkdiff" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()
    # CoBSAT skips ThinkDiff-CLIP: it says so, with no empty results line.
    assert main(["cobsat", "eval", "--config", "tiny-clip", f"paths.root={tmp_path / 'root'}"]) == 0
    assert capsys.readouterr().out.strip() == ("CoBSAT scores ThinkDiff-LVLM; skipped for variant clip "
                                               "(use `thinkdiff compose`)")


def test_flow_command_line_ends_a_failed_run_on_its_message(monkeypatch, capsys):
    from flows import run_from_command_line

    def failing_flow(config: str, overrides: list[str]) -> None:
        raise FileNotFoundError(f"corpus.url_list={overrides[0].split('=')[1]!r}: no such file "
                                "(give a url list, or `demo`)")

    monkeypatch.setattr(sys, "argv", ["prog", "--config", "tiny", "corpus.url_list=/no/such.tsv"])
    with pytest.raises(SystemExit) as exited:
        run_from_command_line(failing_flow, "python -m flows.pipeline")
    assert exited.value.code == 1
    assert capsys.readouterr().err == ("python -m flows.pipeline: error: corpus.url_list='/no/such.tsv': no such file "
                                       "(give a url list, or `demo`)\n")


def test_a_missing_aligner_names_where_it_was_asked_for(tmp_path):
    from thinkdiff import pipeline
    from thinkdiff.config import load_config
    from thinkdiff.storage import stage_dir, write_manifest

    cfg = load_config("tiny", [f"paths.root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"\(eval.aligner\): no such file"):
        pipeline.aligner_spec(load_config("tiny", [f"paths.root={tmp_path}", f"eval.aligner={tmp_path / 'gone'}"]))
    write_manifest(stage_dir(cfg, "train"), {"checkpoint": str(tmp_path / "deleted-checkpoint")})
    with pytest.raises(FileNotFoundError, match=r"deleted-checkpoint/aligner \(this config's training run\)"):
        pipeline.aligner_spec(cfg)


def test_an_aligner_given_in_the_wrong_form_is_named_before_anything_is_made(tmp_path):
    from thinkdiff import pipeline
    from thinkdiff.config import load_config
    from thinkdiff.storage import write_manifest

    run = tmp_path / "train" / "abc"
    write_manifest(run, {"stage": "train", "checkpoint": str(run / "checkpoints" / "step_000020")})
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    cfg = load_config("tiny", [f"paths.root={tmp_path / 'root'}"])
    with pytest.raises(FileNotFoundError,
                       match=rf"no model.safetensors in this directory; this training run's aligner is "
                             rf"{run}/checkpoints/step_000020/aligner"):
        pipeline.aligner_spec(cfg, str(run))
    with pytest.raises(ValueError, match=r"notes.txt \(--model / --aligner\): not an official .pth checkpoint"):
        pipeline.aligner_spec(cfg, str(tmp_path / "notes.txt"))
    assert not (tmp_path / "root").exists()
