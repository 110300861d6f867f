"""Covers: a failing `accelerate launch` surfaces as a clear error with the subprocess's own message,
and writes the resolved config the launch used."""

from __future__ import annotations

import pytest

from thinkdiff.config import load_config
from thinkdiff.train.launch import TrainingLaunchError, launch_training

pytestmark = pytest.mark.integration


def test_launch_failure_carries_the_reason(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}"])
    with pytest.raises(TrainingLaunchError) as err:
        launch_training(cfg, tmp_path / "no-features", tmp_path / "run")
    message = str(err.value)
    assert "training exited with" in message and "a rerun resumes" in message
    assert "no-features: no such directory" in message and "run `thinkdiff features`" in message
    assert load_config(tmp_path / "run" / "config.yaml").to_dict() == cfg.to_dict()
