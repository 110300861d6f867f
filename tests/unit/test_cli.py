"""Covers: `thinkdiff --help` lists the commands; `config` prints the resolved config; bad input
exits with code 2 and a message naming the key, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import yaml

from thinkdiff.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "thinkdiff", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("corpus", "features", "train", "config", "aligner"):
        assert command in out


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--config", "tiny", "train.lr=2e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 2e-4 and printed["preset"] == "tiny"


def test_bad_override_is_exit_2_with_named_key(capsys):
    assert main(["config", "--config", "tiny", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key `train.lrr`; did you mean `train.lr`?" in err and "Traceback" not in err


def test_train_without_features_names_the_fix(capsys, tmp_path):
    assert main(["train", "--config", "tiny", f"paths.root={tmp_path}"]) == 2
    assert "run `thinkdiff features`" in capsys.readouterr().err
