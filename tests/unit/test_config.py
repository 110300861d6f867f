"""Covers: every preset loads and validates; dotted overrides with type coercion; unknown, missing
and mistyped keys rejected with messages naming key, value and fix; the paper preset carries the
numbers of docs/method.md; fingerprints follow what a stage computes."""

from __future__ import annotations

import shutil

import pytest

from thinkdiff.cli import main
from thinkdiff.config import available_presets, load_config
from thinkdiff.errors import ConfigError
from thinkdiff.storage import features_fingerprint, stage_dir, train_fingerprint, write_manifest

PAPER_INSTRUCTIONS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
    "Generate a prompt that can recreate the image in a 2D diffusion model.",
    "Provide a descriptive prompt to reproduce the given image using a diffusion model.",
    "Create a prompt suitable for a 2D diffusion model to generate the same image.",
    "Summarize the visual details as a prompt for a 2D diffusion model.",
    "Write a clear prompt to guide a 2D diffusion model in recreating the image.",
]


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_loads_validates_and_round_trips(preset, tmp_path):
    cfg = load_config(preset)
    assert cfg.preset == preset
    # The resolved YAML is itself a loadable config (it is what the train stage hands to accelerate).
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).to_dict() == cfg.to_dict()


def test_presets_include_tiny_and_paper():
    assert {"tiny", "paper-lvlm"} <= set(available_presets())


def test_paper_preset_has_reference_hyperparameters():
    cfg = load_config("paper-lvlm")
    assert cfg.models.vlm.id == "Qwen/Qwen2-VL-7B-Instruct"
    assert cfg.models.t5.id == "google/flan-t5-xxl"
    assert cfg.models.flux.id == "black-forest-labs/FLUX.1-dev"
    f, t = cfg.features, cfg.train
    assert f.instructions == PAPER_INSTRUCTIONS
    assert (f.temperature, f.top_p, f.max_new_tokens, f.max_feature_rows) == (0.6, 0.9, 256, 128)
    assert f.system_prompt == "You are a helpful assistant."
    assert (t.lr, t.warmup_start_lr, t.warmup_steps, t.final_lr) == (1e-4, 1e-6, 2000, 8e-5)
    assert t.betas == [0.9, 0.999] and t.weight_decay == 0.05
    # The paper's global batch (25k steps x 96: about 2.4M samples), whatever the process count.
    assert (t.batch_size, t.max_steps, t.max_source_rows, t.max_target_tokens) == (96, 25000, 128, 128)
    assert load_config("paper-clip").train.batch_size == 168
    assert t.mixed_precision == "bf16"


def test_tiny_preset_is_offline():
    cfg = load_config("tiny")
    assert {cfg.models.vlm.id, cfg.models.t5.id} == {"tiny"}
    assert cfg.features.instructions == PAPER_INSTRUCTIONS


def test_override_coerces_to_field_type():
    cfg = load_config("tiny", ["train.lr=2e-4", "train.max_steps=70", "features.instructions=[a, b]",
                               "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 70
    assert cfg.features.instructions == ["a", "b"]
    assert cfg.train.betas == [0.8, 0.9]


# A mistyped override is the command line's mistake, not the preset file's: the error names it.
def test_unknown_key_is_rejected_with_suggestion():
    with pytest.raises(ConfigError, match=r"^override 'train.lrr=1': unknown key `train.lrr`; did you mean `train.lr`"):
        load_config("tiny", ["train.lrr=1"])


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="^override 'optim.lr=1': unknown key `optim`"):
        load_config("tiny", ["optim.lr=1"])


def test_text_overrides_are_taken_as_typed_and_bad_yaml_is_named():
    """YAML would read a revision `0755` as the number 493, cut text at ` #` and fail on `[note] ...`."""
    cfg = load_config("tiny", ["models.vlm.revision= 0755 ", "features.system_prompt=[note] be brief #1",
                               "tracking.experiment='quoted'", 'tracking.registered_model="a: b"'])
    assert (cfg.models.vlm.revision, cfg.features.system_prompt) == ("0755", "[note] be brief #1")
    assert (cfg.tracking.experiment, cfg.tracking.registered_model) == ("quoted", "a: b")
    assert load_config("tiny", ["train.betas=[0.8, 0.9]"]).train.betas == [0.8, 0.9]  # other fields still read YAML
    with pytest.raises(ConfigError, match=r"^override 'train.betas=\[0.9, 0.99': '\[0.9, 0.99' is not a valid value \("
                                          r".*\); write lists as \[a, b\]"):
        load_config("tiny", ["train.betas=[0.9, 0.99"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"^override 'train.max_steps=many': `train.max_steps`='many' is not a "
                                          r"valid int; write a whole number"):
        load_config("tiny", ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"`train.max_steps`=2.5 is not a valid int"):
        load_config("tiny", ["train.max_steps=2.5"])
    for infinite in ("inf", ".nan", "1e999"):
        with pytest.raises(ConfigError, match=r"`train.lr`=.* is not a valid float; write a finite number"):
            load_config("tiny", [f"train.lr={infinite}"])


def test_override_of_a_section_or_inside_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"^override 'train=5': `train` is a section; override its keys"):
        load_config("tiny", ["train=5"])
    with pytest.raises(ConfigError, match=r"^override 'train.lr.x=1': `train.lr` is a value, not a section"):
        load_config("tiny", ["train.lr.x=1"])


def test_baselines_are_other_generators_than_thinkdiff():
    assert load_config("tiny", ["eval.baselines=[]"]).eval.baselines == []
    with pytest.raises(ConfigError,
                       match=r"eval.baselines=\['thinkdiff'\]: list distinct generators beside thinkdiff: text-bridge"):
        load_config("tiny", ["eval.baselines=[thinkdiff]"])
    with pytest.raises(ConfigError, match=r"eval.baselines=\['oracle', 'oracle'\]"):
        load_config("tiny", ["eval.baselines=[oracle, oracle]"])


def test_decoder_attention_is_sdpa_or_flex():
    assert load_config("tiny", ["train.decoder_attention=flex", "train.compile=true"]).train.decoder_attention == "flex"
    with pytest.raises(ConfigError, match=r"train.decoder_attention='cudnn'.*use `sdpa` or `flex`"):
        load_config("tiny", ["train.decoder_attention=cudnn"])
    with pytest.raises(ConfigError, match=r"train.decoder_attention='flex'.*set train.compile=true as well"):
        load_config("tiny", ["train.decoder_attention=flex"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config("tiny", ["train.lr"])


def test_missing_key_in_file_is_named(tmp_path):
    text = load_config("tiny").to_yaml().replace("  top_p: 0.9\n", "")
    path = tmp_path / "incomplete.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"incomplete.yaml: missing key `features.top_p`"):
        load_config(path)


def test_a_section_override_keeps_the_keys_it_does_not_name():
    cfg = load_config("tiny", ["models.vlm={id: /models/qwen, dtype: bfloat16}"])
    assert (cfg.models.vlm.id, cfg.models.vlm.dtype, cfg.models.vlm.revision) == ("/models/qwen", "bfloat16", "tiny-v1")
    with pytest.raises(ConfigError, match=r"override 'models.vlm={idd: x}': unknown key `models.vlm.idd`"):
        load_config("tiny", ["models.vlm={idd: x}"])


def test_a_key_given_twice_in_a_file_is_named(tmp_path):
    """YAML keeps the last of two equal keys; a preset edited by hand would then run the other value."""
    path = tmp_path / "twice.yaml"
    path.write_text(load_config("tiny").to_yaml().replace("  lr: ", "  lr: 0.5\n  lr: ", 1))
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML \(.*key 'lr' is given twice"):
        load_config(path)


@pytest.mark.parametrize(("name", "content", "found"), [
    ("logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), r"byte 0 is not UTF-8"),
    ("tiny.bin", b"a\x00b", r"it holds NUL bytes"),
])
def test_a_binary_config_file_is_named_in_one_line(tmp_path, capsys, name, content, found):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"{path}: not a YAML text file \({found}\); give a config YAML or a preset"):
        load_config(path)
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"thinkdiff config: error: {path}: not a YAML text file") and len(err.splitlines()) == 1


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "control.yaml"
    path.write_text("train:\n  lr: \x01\n")
    with pytest.raises(ConfigError, match=r"control.yaml: not valid YAML \(.*special characters") as err:
        load_config(path)
    assert len(str(err.value).splitlines()) == 1


def test_validation_names_key_value_and_fix():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["features.top_p=1.5", "train.max_source_rows=64"])
    message = str(err.value)
    assert "features.top_p=1.5: use a value in (0, 1]" in message
    assert "train.max_source_rows=64" in message and "features.max_feature_rows=16" in message


def test_each_section_names_its_own_problems_and_the_config_lists_them_in_order():
    cfg = load_config("tiny")
    assert [cfg.models.problems(), cfg.paths.problems(), cfg.corpus.problems(), cfg.features.problems(),
            cfg.train.problems(), cfg.tracking.problems(), cfg.eval.problems()] == [[]] * 7
    cfg.eval.top_p, cfg.eval.judge, cfg.eval.dataset = 2.0, "synthetic", "/data/cobsat"
    assert cfg.eval.problems() == [
        "eval.judge='synthetic': the synthetic judge reads only the synthetic set's renders; "
        "set eval.dataset=synthetic",
        "eval.top_p=2.0: use a value in (0, 1]",
    ]
    # The bound the feature store puts on the split is the config's to give: alone, the section cannot see it.
    cfg.train.max_source_rows = 64
    assert cfg.train.problems() == []
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["eval.steps=0", "train.max_target_tokens=1", "train.max_source_rows=64", "variant=x",
                             "features.top_p=1.5", "models.t5.dtype=fp8", "tracking.experiment=' '"])
    assert str(err.value).splitlines() == [
        "invalid config (preset 'tiny'):",
        "  variant='x': use lvlm or clip",
        "  models.t5.dtype='fp8': use one of float32, bfloat16, float16",
        "  features.top_p=1.5: use a value in (0, 1]",
        "  train.max_source_rows=64: the feature store keeps only features.max_feature_rows=16 rows; "
        "lower train.max_source_rows or raise features.max_feature_rows",
        "  train.max_target_tokens=1: use at least 2",
        "  tracking.experiment=' ': name an MLflow experiment",
        "  eval.steps=0: use at least 1 (the paper: 28)",
    ]


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="presets: .*paper-lvlm.*tiny"):
        load_config("nope")


def test_the_global_batch_splits_evenly_over_the_processes():
    assert load_config("paper-lvlm", ["train.num_processes=8"]).train.batch_size == 96
    with pytest.raises(ConfigError,
                       match=r"train.batch_size=96: the global batch is split evenly over train.num_processes=5"):
        load_config("paper-lvlm", ["train.num_processes=5"])


def test_fingerprints_follow_what_a_stage_computes():
    base = load_config("tiny")
    # Observation-only settings keep the training directory; what changes results moves it.
    assert train_fingerprint(load_config("tiny", ["train.log_every=3"])) == train_fingerprint(base)
    assert train_fingerprint(load_config("tiny", ["train.compile=true"])) == train_fingerprint(base)
    assert train_fingerprint(load_config("tiny", ["train.decoder_attention=flex", "train.compile=true"])) == (
        train_fingerprint(base))
    assert features_fingerprint(load_config("tiny", ["features.preprocess_workers=7"])) == features_fingerprint(base)
    assert train_fingerprint(load_config("tiny", ["train.lr=2e-3"])) != train_fingerprint(base)
    # Training settings do not invalidate cached features; the VLM and sampling settings do.
    assert features_fingerprint(load_config("tiny", ["train.lr=2e-3"])) == features_fingerprint(base)
    assert features_fingerprint(load_config("tiny", ["features.temperature=0.7"])) != features_fingerprint(base)
    # Upstream changes propagate downstream.
    assert train_fingerprint(load_config("tiny", ["corpus.seed=1"])) != train_fingerprint(base)


def test_a_url_list_is_fingerprinted_by_its_content(tmp_path):
    urls = tmp_path / "urls.tsv"
    urls.write_text("url\tcaption\nhttp://127.0.0.1/a.jpg\ta red circle\n")
    cfg = load_config("tiny", [f"corpus.url_list={urls}", "corpus.input_format=tsv"])
    corpus_dir, trained_from = stage_dir(cfg, "corpus"), train_fingerprint(cfg)
    urls.write_text("url\tcaption\nhttp://127.0.0.1/b.jpg\ta blue square, edited\n")  # same path, new rows
    assert stage_dir(cfg, "corpus") != corpus_dir and train_fingerprint(cfg) != trained_from


def test_another_input_than_the_configs_gets_directories_of_its_own(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}"])
    own_corpus, own_features = stage_dir(cfg, "corpus"), stage_dir(cfg, "features")
    # The config's own directories, named or not, change nothing.
    assert stage_dir(cfg, "features", own_corpus) == own_features
    assert stage_dir(cfg, "train", own_features) == stage_dir(cfg, "train")
    # An img2dataset output made elsewhere: its path decides.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert stage_dir(cfg, "features", elsewhere) not in (own_features, stage_dir(cfg, "features", tmp_path))
    # A feature store of this project: the fingerprint its manifest records.
    write_manifest(elsewhere, {"stage": "features", "fingerprint": "f" * 16})
    other_run = stage_dir(cfg, "train", elsewhere)
    assert other_run != stage_dir(cfg, "train")
    shutil.copytree(elsewhere, tmp_path / "a-copy")  # the same store elsewhere: the same training
    assert other_run.name == train_fingerprint(cfg, tmp_path / "a-copy")


def test_the_tbdn_preset_is_paper_lvlm_evaluating_tbdn():
    """conf/paper-tbdn.yaml reproduces TBDN's run on the paper setup: it may differ from paper-lvlm only in
    what it evaluates, so the two never drift apart."""
    from thinkdiff.registry import flatten

    tbdn, lvlm = (flatten(load_config(name).to_dict()) for name in ("paper-tbdn", "paper-lvlm"))
    assert {k for k in lvlm if tbdn[k] != lvlm[k]} == {"preset", "eval.generator", "eval.baselines"}
    assert (tbdn["eval.generator"], tbdn["eval.tbdn_alpha"], tbdn["models.vlm.id"]) == (
        "tbdn", "0.5", "Qwen/Qwen2-VL-7B-Instruct")


def test_cluster_settings_change_no_stage_directory(tmp_path):
    """Where a stage runs changes how fast, not what: every stage directory stays where it was."""
    base = load_config("tiny", [f"paths.root={tmp_path}"])
    spread = load_config("tiny", [f"paths.root={tmp_path}", "cluster.engine=ray", "cluster.address=auto",
                                  "cluster.gpus_per_worker=0.5", "cluster.cpus_per_worker=3"])
    assert spread.cluster.engine == "ray" and spread.cluster.gpus_per_worker == 0.5
    assert [stage_dir(spread, stage) for stage in ("corpus", "features", "train")] == [
        stage_dir(base, stage) for stage in ("corpus", "features", "train")]


def test_cluster_settings_are_checked_with_key_value_and_fix():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["cluster.engine=spark", "cluster.address=http://head", "cluster.gpus_per_worker=1.5",
                             "cluster.cpus_per_worker=0"])
    assert str(err.value).splitlines()[1:] == [
        "  cluster.engine='spark': use one of local, ray",
        "  cluster.address='http://head': use \"\" (a temporary local Ray), auto, ray://HEAD:10001 or HEAD:6379",
        "  cluster.gpus_per_worker=1.5: use 0, a fraction of 1, or a whole number of GPUs",
        "  cluster.cpus_per_worker=0.0: use a value > 0, e.g. 4",
    ]
    for address in ("", "auto", "ray://head:10001", "10.0.0.5:6379"):
        assert load_config("tiny", ["paths.root=/srv/thinkdiff", "cluster.engine=ray",
                                    f"cluster.address={address}"]).cluster.address == address
    # A cluster joined by address runs its workers in their own directories: the root must be absolute.
    with pytest.raises(ConfigError, match=r"paths.root='data': the cluster's workers resolve a relative root .*"
                                          r"absolute path that every node mounts"):
        load_config("tiny", ["cluster.engine=ray", "cluster.address=auto"])
    assert load_config("tiny", ["cluster.engine=ray"]).paths.root == "data"  # a temporary local Ray shares this one's
