"""Covers: the aligner architecture of docs/method.md (per-token MLP with exact GELU and
RMSNorm eps 1e-6, 31.5M parameters at paper shapes), save/load as safetensors, the modes of what
the atomic writers leave (readable by a team sharing paths.root), and the converter of the
official .pth checkpoint including its rejection of other layouts."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from thinkdiff.cli import main
from thinkdiff.errors import DataContractError
from thinkdiff.models.aligner import Aligner, AlignerConfig, import_official_checkpoint, weights_sha256
from thinkdiff.storage import atomic_write_bytes, temp_path_for


def make_aligner(in_dim=12, out_dim=8, seed=0):
    torch.manual_seed(seed)
    aligner = Aligner(AlignerConfig(in_dim=in_dim, out_dim=out_dim))
    aligner.init_norm_from(torch.rand(out_dim) + 0.5)
    return aligner


def official_state(aligner: Aligner) -> dict[str, torch.Tensor]:
    return {
        "mm_projector.0.weight": aligner.fc1.weight.detach().clone(),
        "mm_projector.0.bias": aligner.fc1.bias.detach().clone(),
        "mm_projector.2.weight": aligner.fc2.weight.detach().clone(),
        "mm_projector.2.bias": aligner.fc2.bias.detach().clone(),
        "mm_projector.3.weight": aligner.norm.weight.detach().clone(),
    }


def test_paper_shape_parameter_count():
    aligner = Aligner(AlignerConfig(in_dim=3584, out_dim=4096))
    assert sum(p.numel() for p in aligner.parameters()) == 31_469_568  # "31.5M" in the paper


def test_forward_is_linear_gelu_linear_rmsnorm_per_token():
    aligner = make_aligner()
    x = torch.randn(3, 5, 12)
    h = torch.nn.functional.linear(x, aligner.fc1.weight, aligner.fc1.bias)
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU
    h = torch.nn.functional.linear(h, aligner.fc2.weight, aligner.fc2.bias)
    expected = aligner.norm.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    out = aligner(x)
    assert out.shape == (3, 5, 8)
    torch.testing.assert_close(out, expected)
    # Per token: each position depends on its own input only.
    torch.testing.assert_close(aligner(x[:, 2:3]), out[:, 2:3])


def test_norm_init_copies_weight_and_checks_shape():
    aligner = Aligner(AlignerConfig(in_dim=4, out_dim=6))
    weight = torch.arange(6, dtype=torch.float32)
    aligner.init_norm_from(weight)
    assert torch.equal(aligner.norm.weight.detach(), weight)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        aligner.init_norm_from(torch.ones(5))


def test_save_and_load_round_trip(tmp_path):
    aligner = make_aligner()
    out = aligner.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = Aligner.from_pretrained(out)
    for key, value in aligner.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert set(load_file(out / "model.safetensors")) == {
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "norm.weight"}


def test_written_files_and_directories_get_the_umask_modes(tmp_path):
    # tempfile's private 0600 / 0700 must not survive the rename: workers of a team share paths.root.
    umask = os.umask(0o022)
    try:
        out = make_aligner().save_pretrained(tmp_path / "a")
        atomic_write_bytes(tmp_path / "m.json", b"{}")
        parquet_like = temp_path_for(tmp_path / "s.parquet")
    finally:
        os.umask(umask)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o777 & ~umask
    assert {mode(p) for p in [*out.iterdir(), tmp_path / "m.json", parquet_like]} == {0o666 & ~umask}


def test_save_refuses_to_overwrite(tmp_path):
    aligner = make_aligner()
    aligner.save_pretrained(tmp_path / "a")
    before = (tmp_path / "a" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_aligner(seed=1).save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == before


def test_load_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Aligner.from_pretrained(tmp_path)


def test_import_official_checkpoint_matches_source(tmp_path):
    aligner = make_aligner(in_dim=12, out_dim=8)
    torch.save({"model": official_state(aligner), "epoch": 3}, tmp_path / "official.pth")
    out = import_official_checkpoint(tmp_path / "official.pth", tmp_path / "converted")
    converted = Aligner.from_pretrained(out)
    assert converted.config.in_dim == 12 and converted.config.out_dim == 8
    x = torch.randn(2, 4, 12)
    torch.testing.assert_close(converted(x), aligner(x), rtol=0, atol=0)
    # One aligner, one identity (CoBSAT results are keyed by it): the .pth and its converted directory.
    torch.save({"model": official_state(aligner), "epoch": 4}, tmp_path / "resaved.pth")
    assert weights_sha256(tmp_path / "official.pth") == weights_sha256(out) == weights_sha256(tmp_path / "resaved.pth")
    make_aligner(in_dim=12, out_dim=8, seed=1).save_pretrained(tmp_path / "another")
    assert weights_sha256(tmp_path / "another") != weights_sha256(out)


def test_import_official_via_cli(tmp_path, capsys):
    torch.save({"model": official_state(make_aligner())}, tmp_path / "official.pth")
    assert main(["aligner", "import-official", str(tmp_path / "official.pth"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert str(tmp_path / "out") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (lambda s: s, "expected a dict whose key 'model'"),
        (lambda s: {"state_dict": s}, "expected a dict whose key 'model'"),
        (lambda s: {"model": {k: v for k, v in s.items() if k != "mm_projector.3.weight"}},
         r"missing \['mm_projector.3.weight'\]"),
        (lambda s: {"model": {**s, "mm_projector.4.weight": s["mm_projector.3.weight"]}},
         r"unexpected \['mm_projector.4.weight'\]"),
        (lambda s: {"model": {**s, "mm_projector.2.bias": torch.zeros(3)}}, r"mm_projector.2.bias has shape \(3,\)"),
        # A weight of the wrong rank: the file, the key, and the shape expected against the one found.
        (lambda s: {"model": {**s, "mm_projector.0.weight": torch.zeros(96)}},
         r"bad.pth: mm_projector.0.weight has shape \(96,\), expected \(8, in_dim\), a matrix"),
        (lambda s: {"model": {**s, "mm_projector.2.weight": torch.zeros(8)}},
         r"bad.pth: mm_projector.2.weight has shape \(8,\), expected \(8, 8\)"),
        (lambda s: {"model": {**s, "mm_projector.0.weight": torch.zeros(8, 12, 1)}},
         r"mm_projector.0.weight has shape \(8, 12, 1\), expected \(8, in_dim\)"),
        (lambda s: {"model": {**s, "mm_projector.0.bias": [0.0] * 8}},
         r"mm_projector.0.bias is a list, expected a tensor"),
    ],
)
def test_import_official_rejects_other_layouts(tmp_path, payload, message):
    torch.save(payload(official_state(make_aligner())), tmp_path / "bad.pth")
    with pytest.raises(DataContractError, match=message):
        import_official_checkpoint(tmp_path / "bad.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_weight_of_the_wrong_rank_is_one_line_through_the_cli(tmp_path, capsys):
    state = {**official_state(make_aligner()), "mm_projector.0.weight": torch.zeros(96)}
    torch.save({"model": state}, tmp_path / "rank1.pth")
    assert main(["aligner", "import-official", str(tmp_path / "rank1.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{tmp_path / 'rank1.pth'}: mm_projector.0.weight has shape (96,), expected (8, in_dim)" in err


class _NotAWeight:
    pass


def test_import_official_never_unpickles_objects(tmp_path, capsys):
    torch.save({"model": _NotAWeight()}, tmp_path / "evil.pth")
    with pytest.raises(DataContractError, match="weights-only"):
        import_official_checkpoint(tmp_path / "evil.pth", tmp_path / "out")
    # Through the CLI the same file is a clear error and exit code 2, not a traceback.
    assert main(["aligner", "import-official", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "weights-only" in err and "never loads pickled code" in err
    assert "weights_only" not in err and len(err.strip().splitlines()) == 1  # not PyTorch's advice to turn it off
    assert main(["aligner", "import-official", str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"{tmp_path} is a directory: give the released aligner file" in capsys.readouterr().err
