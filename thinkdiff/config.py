"""One typed config tree, loaded from a complete YAML preset plus dotted overrides.

    from thinkdiff.config import load_config
    cfg = load_config("tiny", ["train.lr=2e-4"])   # a preset name in conf/ or a path to a YAML file

Every field is required: a preset states every setting (no inheritance chains, no hidden defaults),
unknown keys are rejected, values are coerced to the annotated type (so YAML's `1e-4`, which PyYAML
reads as a string, is a float here), and `validate()` runs before any model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from thinkdiff.errors import ConfigError, first_line

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

TINY_MODEL_ID = "tiny"
DTYPES = ("float32", "bfloat16", "float16")
VLM_BASELINES = ("text-bridge", "tbdn")
"""The generators that draw with a VLM and no aligner: eval.baselines may give them another VLM."""


class _Problems(list[str]):
    """The failed rules of a config section, one message each, naming key, value and fix."""

    def need(self, ok: bool, key: str, value: Any, fix: str) -> None:
        if not ok:
            self.append(f"{key}={value!r}: {fix}")


@dataclass(kw_only=True)
class ModelSource:
    id: str
    """Hugging Face id, a local directory, or `tiny` (the same class, small and random-init, offline)."""
    revision: str
    """Hub revision (branch, tag or commit); recorded in every output. Ignored for local dirs and `tiny`."""
    dtype: str
    """Dtype of the frozen weights: float32, bfloat16 or float16."""


@dataclass(kw_only=True)
class ModelsConfig:
    vlm: ModelSource
    """The frozen vision-language model whose generated-token states are aligned (Qwen2-VL)."""
    t5: ModelSource
    """The frozen encoder-decoder whose decoder supervises the aligner (Flan-T5)."""
    flux: ModelSource
    """The diffusion model that consumes aligned features at inference (FLUX.1)."""
    vision: ModelSource
    """ThinkDiff-CLIP only: the vision tower (BLIP-2's EVA-CLIP ViT-g/14, or any CLIP vision model)."""

    def problems(self) -> list[str]:
        p = _Problems()
        for name in ("vlm", "t5", "flux", "vision"):
            src: ModelSource = getattr(self, name)
            p.need(bool(src.id.strip()), f"models.{name}.id", src.id,
                   "give a Hugging Face id, a local directory or `tiny`")
            p.need(src.dtype in DTYPES, f"models.{name}.dtype", src.dtype, f"use one of {', '.join(DTYPES)}")
        return p


@dataclass(kw_only=True)
class PathsConfig:
    root: str
    """Every stage writes into {root}/{stage}/{fingerprint}/."""

    def problems(self) -> list[str]:
        p = _Problems()
        p.need(bool(self.root.strip()), "paths.root", self.root, "give a directory for stage outputs")
        return p


ENGINES = ("local", "ray")


@dataclass(kw_only=True)
class ClusterConfig:
    """Where the stages run (docs/cluster.md). It changes how fast, never what: no stage fingerprint holds it."""

    engine: str
    """`local` (every stage on this machine, as `make demo`) or `ray`: corpus shards, feature shards and
    CoBSAT (task, shot) units spread over the Ray cluster's workers, training on one of its GPU workers."""
    address: str
    """engine ray: "" starts a temporary local Ray for the run; `auto` joins the cluster this machine is
    a node of (`ray start`); `ray://host:10001` joins a remote head through Ray Client; `host:6379` its GCS."""
    gpus_per_worker: float
    """engine ray: GPUs each feature shard, CoBSAT unit and training task holds (0 on a CPU-only cluster;
    a fraction shares one GPU, above 1 a whole number)."""
    cpus_per_worker: float
    """engine ray: CPUs each of those tasks holds (the image preprocessing threads run on them)."""

    def problems(self, root: str | None = None) -> list[str]:
        """This section's rules; with `root` (paths.root, from RunConfig.validate) also that a cluster
        joined by address, whose workers run in their own directories, is given an absolute one."""
        p = _Problems()
        p.need(self.engine in ENGINES, "cluster.engine", self.engine, f"use one of {', '.join(ENGINES)}")
        address = self.address.strip()
        p.need(address in ("", "auto") or address.startswith("ray://") or _host_port(address),
               "cluster.address", self.address,
               'use "" (a temporary local Ray), auto, ray://HEAD:10001 or HEAD:6379')
        p.need(self.gpus_per_worker >= 0 and (self.gpus_per_worker <= 1 or self.gpus_per_worker.is_integer()),
               "cluster.gpus_per_worker", self.gpus_per_worker, "use 0, a fraction of 1, or a whole number of GPUs")
        p.need(self.cpus_per_worker > 0, "cluster.cpus_per_worker", self.cpus_per_worker, "use a value > 0, e.g. 4")
        if root is not None and self.engine == "ray" and self.address:
            p.need(Path(root).is_absolute(), "paths.root", root,
                   "the cluster's workers resolve a relative root in their own directories: give an absolute path "
                   "that every node mounts (docs/cluster.md)")
        return p


def _host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and "/" not in host and port.isdigit())


@dataclass(kw_only=True)
class CorpusConfig:
    url_list: str
    """`demo` (generated images served on 127.0.0.1) or a url + caption file (CC3M/CC12M/SBU TSV, LAION parquet)."""
    input_format: str
    """Format of `url_list`: csv, csv.gz, tsv, tsv.gz or parquet (csv/tsv need a header row)."""
    url_col: str
    """Column holding the image url (LAION: URL)."""
    caption_col: str
    """Column holding the caption (LAION: TEXT); kept with every image."""
    image_size: int
    """img2dataset image_size: side in pixels after resizing."""
    resize_mode: str
    """img2dataset resize_mode: no, border, keep_ratio, keep_ratio_largest or center_crop."""
    shard_size: int
    """img2dataset number_sample_per_shard: images per corpus shard (and per feature shard)."""
    processes: int
    """img2dataset processes_count."""
    threads: int
    """img2dataset thread_count (download threads per process)."""
    retries: int
    """img2dataset retries per url."""
    timeout_s: int
    """img2dataset timeout per download, seconds."""
    min_success_rate: float
    """The stage fails when fewer than this fraction of urls yield an image."""
    demo_images: int
    """`demo` only: number of generated images (coloured shapes whose captions describe them)."""
    demo_broken: int
    """`demo` only: extra urls that are broken on purpose (alternately 404 and a corrupt JPEG)."""
    seed: int
    """`demo` only: seed of the generator."""

    def problems(self) -> list[str]:
        p = _Problems()
        formats = ("csv", "csv.gz", "tsv", "tsv.gz", "parquet")
        p.need(self.input_format in formats, "corpus.input_format", self.input_format,
               f"use one of {', '.join(formats)}")
        p.need(bool(self.url_col), "corpus.url_col", self.url_col, "name the url list's url column")
        p.need(bool(self.caption_col), "corpus.caption_col", self.caption_col, "name the url list's caption column")
        modes = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
        p.need(self.resize_mode in modes, "corpus.resize_mode", self.resize_mode, f"use one of {', '.join(modes)}")
        p.need(self.image_size >= 28, "corpus.image_size", self.image_size,
               "use at least 28 (one Qwen2-VL merged patch)")
        p.need(self.shard_size >= 1, "corpus.shard_size", self.shard_size, "use at least 1")
        p.need(self.processes >= 1, "corpus.processes", self.processes, "use at least 1")
        p.need(self.threads >= 1, "corpus.threads", self.threads, "use at least 1")
        p.need(self.retries >= 0, "corpus.retries", self.retries, "use 0 or more")
        p.need(self.timeout_s >= 1, "corpus.timeout_s", self.timeout_s, "use at least 1 second")
        p.need(0 <= self.min_success_rate <= 1, "corpus.min_success_rate", self.min_success_rate,
               "use a fraction in [0, 1]")
        p.need(self.demo_images >= 1, "corpus.demo_images", self.demo_images, "use at least 1")
        p.need(self.demo_broken >= 0, "corpus.demo_broken", self.demo_broken, "use 0 or more")
        return p


@dataclass(kw_only=True)
class FeaturesConfig:
    instructions: list[str]
    """User instructions, one drawn per image with a seeded RNG keyed by the image key."""
    system_prompt: str
    """System message of the chat prompt."""
    temperature: float
    """Sampling temperature of the caption generation."""
    top_p: float
    """Nucleus sampling threshold."""
    max_new_tokens: int
    """Generation stops at EOS or after this many tokens."""
    max_feature_rows: int
    """Feature rows stored per image: training never reads past row train.max_source_rows."""
    storage_dtype: str
    """Dtype of stored feature rows: bfloat16, float16, float32, or float8_e4m3 (1 byte per value plus a
    float32 scale per row: about half the disk of bfloat16)."""
    min_pixels: int
    """Qwen2-VL image processor: smallest image area after resizing."""
    max_pixels: int
    """Qwen2-VL image processor: largest image area after resizing (Qwen2-VL's default, 12845056, in the paper
    presets, whose 224 px corpus images give 64 visual tokens each)."""
    batch_size: int
    """Images per generate() call (LVLM) or per vision forward (CLIP)."""
    preprocess_workers: int
    """Threads that preprocess the next batch's images while the model works on the current one."""
    kv_cache: str
    """VLM generation path: `static` (the project's decode loop over a reused preallocated KV cache,
    each generated token's state kept as it decodes; needed by `compile`) or `dynamic` (HF generate,
    then a states pass over the generated ids). Both sample the same ids. Also used by CoBSAT generation."""
    compile: bool
    """Compile the VLM decode step to a CUDA graph (CUDA only, with kv_cache=static). Also used by
    CoBSAT generation."""
    vision_image_size: int
    """ThinkDiff-CLIP only: input side of the vision tower (224 for BLIP-2)."""
    seed: int
    """Seed for instruction choice and sampling (combined with the shard index, so reruns are equal)."""

    def problems(self) -> list[str]:
        p = _Problems()
        p.need(len(self.instructions) > 0 and all(s.strip() for s in self.instructions), "features.instructions",
               self.instructions, "give a non-empty list of non-empty instructions")
        p.need(self.temperature > 0, "features.temperature", self.temperature, "use a value > 0 (sampling)")
        p.need(0 < self.top_p <= 1, "features.top_p", self.top_p, "use a value in (0, 1]")
        p.need(self.max_new_tokens >= 2, "features.max_new_tokens", self.max_new_tokens,
               "use at least 2: the masked split needs two generated tokens")
        p.need(self.max_feature_rows >= 1, "features.max_feature_rows", self.max_feature_rows, "use at least 1")
        storage = (*DTYPES, "float8_e4m3")
        p.need(self.storage_dtype in storage, "features.storage_dtype", self.storage_dtype,
               f"use one of {', '.join(storage)}")
        p.need(28 * 28 <= self.min_pixels <= self.max_pixels, "features.min_pixels", self.min_pixels,
               "use 784 (28*28) <= min_pixels <= features.max_pixels")
        p.need(self.batch_size >= 1, "features.batch_size", self.batch_size, "use at least 1")
        p.need(self.preprocess_workers >= 1, "features.preprocess_workers", self.preprocess_workers, "use at least 1")
        p.need(self.kv_cache in ("static", "dynamic"), "features.kv_cache", self.kv_cache, "use static or dynamic")
        p.need(not self.compile or self.kv_cache == "static", "features.compile", self.compile,
               "compiling the decode step needs features.kv_cache=static")
        p.need(self.vision_image_size >= 28, "features.vision_image_size", self.vision_image_size,
               "use at least 28 (two patches of 14)")
        return p


@dataclass(kw_only=True)
class TrainConfig:
    batch_size: int
    """Samples per optimizer step, over all processes (each takes batch_size / processes; paper: 96 for
    ThinkDiff-LVLM, 168 for ThinkDiff-CLIP)."""
    max_steps: int
    """Optimizer steps of the whole run (paper: 25,000)."""
    lr: float
    """Peak learning rate, reached after the warmup."""
    warmup_start_lr: float
    """Learning rate at step 0; it rises linearly to `lr` over `warmup_steps`."""
    warmup_steps: int
    """Linear warmup length in steps."""
    final_lr: float
    """The cosine decay after the warmup reaches this rate at step `lr_horizon_steps`."""
    lr_horizon_steps: int
    """Step at which the cosine reaches `final_lr` (at least `max_steps`). The official release sets it to
    max_epoch x iters_per_epoch = 200,000 and stops at 25,000, where the rate is still about 9.9e-5;
    equal to `max_steps`, the run ends at `final_lr`."""
    betas: list[float]
    """AdamW betas."""
    weight_decay: float
    """AdamW weight decay, applied to matrices only (not to biases or other 1-D parameters)."""
    max_source_rows: int
    """Upper bound of the masked split s ~ UniformInt[1, min(L-1, max_source_rows)]."""
    max_target_tokens: int
    """T5 target length after re-tokenization (with </s>); longer targets are truncated."""
    max_prefix_tokens: int
    """ThinkDiff-CLIP only: T5 encoder length of caption part 1 (the paper: 32)."""
    t5_dropout: bool
    """Run the frozen T5 (the decoder; for ThinkDiff-CLIP also the encoder that reads caption part 1) with its
    config's dropout while the aligner trains, as the official release does by putting its whole model in
    train mode (0.1 for flan-t5-xxl); false: eval mode. The weights stay frozen either way."""
    aligner_init: str
    """Initial weights of the aligner's Linear layers: `pytorch` (PyTorch's default, as the release does for
    ThinkDiff-LVLM) or `normal` (N(0, 0.02), zero bias: the release's ThinkDiff-CLIP)."""
    blip_captions: bool
    """ThinkDiff-CLIP only: normalise captions as BLIP's caption processor does (lower case, the characters
    .!"()*#:;~ removed, at most 50 words) before the split, as the release does."""
    bucket_window: int
    """Global batches drawn together and grouped by target length, so a batch pads little (1: no bucketing)."""
    compile: bool
    """torch.compile each block of the frozen T5 decoder with dynamic shapes: a few graphs (the first
    block, one shared by the others) for every (source, target) length of the bucketed batches; the
    first step pays the compile."""
    decoder_attention: str
    """The frozen T5 decoder's attention kernel: `sdpa` (PyTorch's SDPA without cuDNN) or `flex`
    (FlexAttention, CUDA only, fast only with `compile`; under measurement, see docs/performance.md)."""
    mixed_precision: str
    """`bf16` autocast (GPU only; the aligner stays fp32) or `no`."""
    checkpoint_every: int
    """Save a checkpoint every this many steps (and at the end)."""
    keep_last: int
    """Checkpoints kept on disk; older ones are deleted after a newer one is complete."""
    log_every: int
    """Log loss, learning rate and throughput every this many steps."""
    seed: int
    """Seed of aligner init, data order and masked splits."""
    num_processes: int
    """Processes `accelerate launch` starts on this machine (one per GPU; 1 on CPU)."""
    launch_args: list[str]
    """Extra `accelerate launch` flags, e.g. for several nodes (--num_machines, --machine_rank, ...)."""

    def problems(self, max_feature_rows: int | None = None) -> list[str]:
        """This section's rules; with `max_feature_rows` (features.max_feature_rows, from RunConfig.validate)
        also the bound it puts on max_source_rows, named next to that key's own rule."""
        p = _Problems()
        p.need(self.batch_size >= 1, "train.batch_size", self.batch_size, "use at least 1")
        p.need(self.max_steps >= 1, "train.max_steps", self.max_steps, "use at least 1")
        p.need(self.lr > 0, "train.lr", self.lr, "use a value > 0")
        p.need(0 < self.warmup_start_lr <= self.lr, "train.warmup_start_lr", self.warmup_start_lr,
               f"use a value in (0, train.lr={self.lr}]")
        p.need(0 <= self.final_lr <= self.lr, "train.final_lr", self.final_lr,
               f"use a value in [0, train.lr={self.lr}]")
        p.need(0 <= self.warmup_steps <= self.max_steps, "train.warmup_steps", self.warmup_steps,
               f"use a value in [0, train.max_steps={self.max_steps}]")
        p.need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", self.betas,
               "give two values in [0, 1)")
        p.need(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "use a value >= 0")
        p.need(self.max_source_rows >= 1, "train.max_source_rows", self.max_source_rows, "use at least 1")
        if max_feature_rows is not None:
            p.need(self.max_source_rows <= max_feature_rows, "train.max_source_rows", self.max_source_rows,
                   f"the feature store keeps only features.max_feature_rows={max_feature_rows} rows; "
                   "lower train.max_source_rows or raise features.max_feature_rows")
        p.need(self.max_target_tokens >= 2, "train.max_target_tokens", self.max_target_tokens, "use at least 2")
        p.need(self.bucket_window >= 1, "train.bucket_window", self.bucket_window, "use 1 (no bucketing) or more")
        p.need(self.max_prefix_tokens >= 1, "train.max_prefix_tokens", self.max_prefix_tokens,
               "use at least 1 (the paper: 32)")
        p.need(self.lr_horizon_steps >= self.max_steps, "train.lr_horizon_steps", self.lr_horizon_steps,
               f"use at least train.max_steps={self.max_steps} (the official release: 200000)")
        p.need(self.aligner_init in ("pytorch", "normal"), "train.aligner_init", self.aligner_init,
               "use pytorch (ThinkDiff-LVLM) or normal (ThinkDiff-CLIP)")
        p.need(self.decoder_attention in ("sdpa", "flex"), "train.decoder_attention", self.decoder_attention,
               "use `sdpa` or `flex` (CUDA only)")
        p.need(self.decoder_attention != "flex" or self.compile, "train.decoder_attention", self.decoder_attention,
               "flex is fast only compiled: set train.compile=true as well (uncompiled it writes every score matrix)")
        p.need(self.mixed_precision in ("no", "bf16"), "train.mixed_precision", self.mixed_precision,
               "use `bf16` or `no`")
        p.need(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, "use at least 1")
        p.need(self.keep_last >= 1, "train.keep_last", self.keep_last,
               "use at least 1 (the latest checkpoint is needed to resume)")
        p.need(self.log_every >= 1, "train.log_every", self.log_every, "use at least 1")
        p.need(self.num_processes >= 1, "train.num_processes", self.num_processes, "use at least 1")
        p.need(self.batch_size % max(self.num_processes, 1) == 0, "train.batch_size", self.batch_size,
               f"the global batch is split evenly over train.num_processes={self.num_processes}: use a multiple of it")
        return p


@dataclass(kw_only=True)
class TrackingConfig:
    uri: str
    """MLflow tracking + registry URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///{paths.root}/mlflow.db."""
    experiment: str
    """MLflow experiment of the training runs."""
    registered_model: str
    """Registered model name of the aligner versions."""
    ui_url: str
    """Where people open the MLflow UI of this store (the links in Prefect artifacts); empty: the tracking
    server when tracking.uri is http(s), else http://127.0.0.1:5000, where `mlflow ui` serves by default."""
    live_training: bool
    """Log a training run to MLflow while it trains (registration logs it whole afterwards either way)."""
    system_metrics: bool
    """With live training: CPU, memory and GPU use in the training run (MLflow's system metrics)."""

    def problems(self) -> list[str]:
        p = _Problems()
        p.need(bool(self.experiment.strip()), "tracking.experiment", self.experiment, "name an MLflow experiment")
        p.need(bool(self.registered_model.strip()), "tracking.registered_model", self.registered_model,
               "name the registered model (default thinkdiff-aligner)")
        return p


@dataclass(kw_only=True)
class EvalConfig:
    dataset: str
    """`synthetic` (generated offline under {paths.root}/cobsat-synthetic-{synthetic_image_size}px) or a directory
    holding the real CoBSAT `datasets/` folder."""
    tasks: list[int]
    """CoBSAT task ids (1..10)."""
    shots: list[int]
    """Demo counts; the papers report 2 and 4."""
    limit: int
    """Prompts per (task, shot), the first ones of the 1000 (1000 = all)."""
    generator: str
    """thinkdiff (VLM -> aligner -> FLUX), text-bridge (VLM writes a prompt, FLUX draws it), tbdn (TBDN's
    training-free bridge: a hint and query-contrastive decoding, arXiv 2601.06169), hybrid (FLUX reads the
    aligned ThinkDiff tokens followed by its own T5 embedding of the text the VLM wrote, from the same VLM
    call), or a sanity baseline: oracle, copy-last, random-theta, random."""
    baselines: list[str]
    """Generators evaluated beside the thinkdiff generator with the same settings and shown with it
    in one table and chart (comparison.md / .png): text-bridge, tbdn, hybrid or sanity baselines;
    `text-bridge@<vlm id>` or `tbdn@<vlm id>` draws with another VLM than models.vlm (its revision
    main). Each is drawn once per settings, whatever the aligner; the nightly promotion run leaves
    them out."""
    aligner: str
    """thinkdiff generator: a directory, an official .pth or models:/name@alias; empty: this config's own
    trained aligner."""
    gen_tokens: int
    """Tokens the VLM generates per prompt (EOS ignored for thinkdiff; the text bridge stops at EOS)."""
    temperature: float
    """VLM sampling temperature at inference."""
    top_p: float
    """VLM nucleus sampling threshold at inference."""
    picture_labels: bool
    """Put "Picture k: " before the k-th image of the VLM's prompt, as Qwen2-VL's chat template does with
    add_vision_id=True (the official release's CoBSAT prompts)."""
    min_pixels: int
    """The VLM's image processor at inference (generators, qwen2-vl judge): smallest image area after
    resizing (Qwen2-VL's default: 3136)."""
    max_pixels: int
    """The VLM's image processor at inference: largest image area after resizing (Qwen2-VL's default,
    12845056, keeps CoBSAT's images at their own size; the features stage has its own limits)."""
    clip_text_tokens: int
    """ThinkDiff-CLIP: max_sequence_length of FLUX's T5 embedding of the text after the image tokens
    (the release: 128)."""
    steps: int
    """FLUX denoising steps."""
    guidance: float
    """FLUX guidance scale."""
    image_size: int
    """FLUX output side in pixels (multiple of 16)."""
    seed: int
    """Seed of generation: FLUX noise uses seed + prompt index (the same at any batch size); VLM sampling
    uses seed + the batch's first prompt index (sampled tokens depend on eval.batch_size)."""
    batch_size: int
    """Prompts per VLM generate() call and per FLUX call."""
    compile: bool
    """FLUX's fast path: fused query/key/value projections and torch.compile of the transformer's
    repeated blocks (one graph per batch size; the first batch pays the compile)."""
    nightly_limit: int
    """Prompts per (task, shot) of the nightly evaluation (sized to fit one hour on one GPU)."""
    judge: str
    """`llava` (the official judge), `qwen2-vl`, or `synthetic` (reads the synthetic set's factors back)."""
    judge_model: ModelSource
    """The judge VLM for llava / qwen2-vl (official: llava-hf/llava-1.5-13b-hf); `tiny` builds one offline."""
    synthetic_image_size: int
    """Side in pixels of the synthetic set's images."""
    clip_score: bool
    """Also compute CoBSAT's secondary metric (its evaluation_icl.py): the CLIP similarity of each generated
    image to the expected caption, and whether CLIP's best caption among the task's options is the expected one."""
    clip_model: ModelSource
    """CLIP model of `clip_score` (CoBSAT: openai/clip-vit-base-patch32); `tiny` builds one offline."""
    tbdn_alpha: float
    """tbdn: query-contrastive decoding's a, logits = (1 + a) * logits(prompt) - a * logits(prompt without
    its final query text); 0 samples what a plain text bridge with TBDN's sampling would (TBDN: 0.5)."""
    tbdn_hint: str
    """tbdn: the hint sentence added to the instruction (TBDN's exact wording is not public); empty: none."""

    def problems(self) -> list[str]:
        p = _Problems()
        p.need(bool(self.tasks) and all(1 <= k <= 10 for k in self.tasks), "eval.tasks", self.tasks,
               "give CoBSAT task ids in 1..10")
        p.need(bool(self.shots) and all(1 <= k <= 8 for k in self.shots), "eval.shots", self.shots,
               "give demo counts in 1..8 (papers: 2 and 4)")
        p.need(1 <= self.limit <= 1000, "eval.limit", self.limit, "use 1..1000 prompts per task and shot")
        p.need(1 <= self.nightly_limit <= 1000, "eval.nightly_limit", self.nightly_limit,
               "use 1..1000 prompts per task and shot")
        p.need(self.batch_size >= 1, "eval.batch_size", self.batch_size, "use at least 1")
        generators = ("thinkdiff", "text-bridge", "tbdn", "hybrid", "oracle", "copy-last", "random-theta", "random")
        p.need(self.generator in generators, "eval.generator", self.generator, f"use one of {', '.join(generators)}")
        p.need(all(b.partition("@")[0] in generators[1:] for b in self.baselines)
               and len(set(self.baselines)) == len(self.baselines), "eval.baselines", self.baselines,
               f"list distinct generators beside thinkdiff: {', '.join(generators[1:])}, or []")
        p.need(all(b.partition("@")[0] in VLM_BASELINES and b.partition("@")[2] for b in self.baselines if "@" in b),
               "eval.baselines", self.baselines,
               f"name another VLM only for {' and '.join(VLM_BASELINES)}, as generator@model-id (e.g. "
               "text-bridge@Qwen/Qwen2.5-VL-7B-Instruct): an aligner generator draws with the VLM of its training")
        p.need(0 <= self.tbdn_alpha <= 10, "eval.tbdn_alpha", self.tbdn_alpha, "use 0..10 (TBDN: 0.5; 0: no contrast)")
        p.need(self.judge in ("synthetic", "llava", "qwen2-vl"), "eval.judge", self.judge,
               "use llava, qwen2-vl or synthetic")
        p.need(self.judge_model.dtype in DTYPES, "eval.judge_model.dtype", self.judge_model.dtype,
               f"use one of {', '.join(DTYPES)}")
        p.need(self.judge != "synthetic" or self.dataset == "synthetic", "eval.judge", self.judge,
               "the synthetic judge reads only the synthetic set's renders; set eval.dataset=synthetic")
        p.need(self.gen_tokens >= 1, "eval.gen_tokens", self.gen_tokens, "use at least 1 (the paper: 128)")
        p.need(self.temperature > 0, "eval.temperature", self.temperature, "use a value > 0 (the paper: 0.6)")
        p.need(0 < self.top_p <= 1, "eval.top_p", self.top_p, "use a value in (0, 1]")
        p.need(28 * 28 <= self.min_pixels <= self.max_pixels, "eval.min_pixels", self.min_pixels,
               "use 784 (28*28) <= min_pixels <= eval.max_pixels")
        p.need(self.clip_text_tokens >= 1, "eval.clip_text_tokens", self.clip_text_tokens,
               "use at least 1 (the release: 128)")
        p.need(self.steps >= 1, "eval.steps", self.steps, "use at least 1 (the paper: 28)")
        p.need(self.image_size >= 16 and self.image_size % 16 == 0, "eval.image_size", self.image_size,
               "use a multiple of 16 (CoBSAT: 512)")
        p.need(self.clip_model.dtype in DTYPES, "eval.clip_model.dtype", self.clip_model.dtype,
               f"use one of {', '.join(DTYPES)}")
        p.need(self.synthetic_image_size >= 32, "eval.synthetic_image_size", self.synthetic_image_size,
               "use at least 32")
        return p


@dataclass(kw_only=True)
class RunConfig:
    preset: str
    """Name of the preset this config came from (informational)."""
    variant: str
    """`lvlm` (ThinkDiff-LVLM: generated-token states of a VLM) or `clip` (ThinkDiff-CLIP: vision tokens)."""
    paths: PathsConfig
    models: ModelsConfig
    corpus: CorpusConfig
    features: FeaturesConfig
    train: TrainConfig
    tracking: TrackingConfig
    eval: EvalConfig
    cluster: ClusterConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=100)

    def validate(self) -> RunConfig:
        """Check values and cross-field rules; raise ConfigError naming key, value and fix.

        Each section checks its own fields; the bound features.max_feature_rows puts on
        train.max_source_rows is handed to the train section, whose messages name it next to that key.
        """
        problems = _Problems()
        problems.need(self.variant in ("lvlm", "clip"), "variant", self.variant, "use lvlm or clip")
        problems += self.models.problems()
        problems += self.paths.problems()
        problems += self.corpus.problems()
        problems += self.features.problems()
        problems += self.train.problems(max_feature_rows=self.features.max_feature_rows)
        problems += self.tracking.problems()
        problems += self.eval.problems()
        problems += self.cluster.problems(root=self.paths.root)
        if problems:
            raise ConfigError(f"invalid config (preset {self.preset!r}):\n  " + "\n  ".join(problems))
        return self


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def resolve_preset_path(name_or_path: str | Path) -> Path:
    """A path to an existing YAML file, or a preset name found in conf/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = CONF_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"config {str(name_or_path)!r} is neither a YAML file nor a preset; presets: {', '.join(available_presets())}"
    )


def load_config(name_or_path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load a preset (name in conf/ or a YAML path), apply `a.b=value` overrides, validate.

    Raises:
        ConfigError: unknown or missing key, a value of the wrong type, or a failed validation rule.
    """
    path = resolve_preset_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # an image or archive given as --config
        raise ConfigError(f"{path}: not a YAML text file (byte {err.start} is not UTF-8); give a config YAML "
                          f"or a preset: {', '.join(available_presets())}") from None
    except PermissionError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror}); give this user read access to it") from None
    if "\0" in text:  # UTF-8 by chance (a tiny binary file): PyYAML would name only an unprintable character
        raise ConfigError(f"{path}: not a YAML text file (it holds NUL bytes); give a config YAML "
                          f"or a preset: {', '.join(available_presets())}")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        # PyYAML's message spans lines (problem, then where): joined, as an error is one line.
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw, prefix="", source=str(path))
    return cfg.validate()


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Rebuild a config from `to_dict()` output (checkpoints, resolved config files)."""
    return _build(RunConfig, raw, prefix="", source=source).validate()


def fingerprint(obj: Any) -> str:
    """Stable short hash of JSON-able data; names stage output directories."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it would keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Set one `a.b=value` in the raw preset, its key and value checked here, so an error names the
    override rather than the preset file."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=2e-4)")
    parts = key.strip().split(".")
    source = f"override {item!r}"
    field_type: Any = RunConfig
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(field_type):
            raise ConfigError(f"{source}: `{prefix}` is a value, not a section")
        _check_known(field_type, [part], f"{prefix}." if prefix else "", source)
        field_type = typing.get_type_hints(field_type)[part]
    # YAML parsing gives lists, numbers and booleans; the value must then fit the field (a whole
    # section is checked with the rest of the preset). A text field takes the text as typed: YAML
    # would read `0755` as 493, cut `a #1` at its comment and refuse `[note] be brief`. Quoted, it
    # is YAML's string, so `""` still gives an empty one.
    text = value.strip()
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    if field_type is str and not quoted:
        parsed: Any = text
    else:
        try:
            parsed = yaml.safe_load(value) if text else value
        except yaml.YAMLError as err:
            problem = first_line(err)
            raise ConfigError(f"{source}: {value!r} is not a valid value ({problem}); write lists as [a, b] and quote "
                              "text holding YAML signs") from None
    if not dataclasses.is_dataclass(field_type):
        _coerce(field_type, parsed, ".".join(parts), source)
    elif not isinstance(parsed, dict):
        first = dataclasses.fields(field_type)[0].name
        raise ConfigError(f"{source}: `{key.strip()}` is a section; override its keys, e.g. {key.strip()}.{first}=...")
    else:  # a section given as a mapping: its keys are the override's, not the preset's
        _check_known(field_type, parsed, f"{key.strip()}.", source)
        for name, hint in typing.get_type_hints(field_type).items():
            if name in parsed and not dataclasses.is_dataclass(hint):
                _coerce(hint, parsed[name], f"{key.strip()}.{name}", source)
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: `{part}` holds a value in the preset, not a section")
    if isinstance(parsed, dict) and isinstance(node.get(parts[-1]), dict):
        parsed = {**node[parts[-1]], **parsed}  # `models.vlm={id: x}` sets the id and keeps the rest
    node[parts[-1]] = parsed


def _check_known(cls: type, keys: typing.Iterable[str], prefix: str, source: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in keys if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean `{prefix}{close[0]}`?" if close else f"valid keys here: {', '.join(names)}"
        raise ConfigError(f"{source}: unknown key `{prefix}{key}`; {hint}")


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or '<top>'}` must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _check_known(cls, raw, prefix, source)
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(
            f"{source}: missing key `{prefix}{missing[0]}`; presets are complete, add it to the file "
            f"(see conf/paper-lvlm.yaml for every key)"
        )
    values = {n: _coerce(hints[n], raw[n], f"{prefix}{n}", source) for n in names}
    return cls(**values)


_WRITE_AS = {bool: "write true or false", int: "write a whole number, e.g. 100",
             float: "write a finite number, e.g. 2e-4",
             str: "write a plain text value, not a list, a mapping or nothing"}


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.", source=source)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: `{key}` must be a list, e.g. [1, 2], got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (types.UnionType, typing.Union):
        raise TypeError(f"config field {key} uses a union type; config fields must be concrete")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):  # inf and nan too: no setting wants them
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)) or value is None:
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: `{key}`={value!r} is not a valid {tp.__name__}; {_WRITE_AS[tp]}") from None
    raise TypeError(f"unsupported config type {tp!r} for {key}")


__all__ = [
    "ClusterConfig",
    "CorpusConfig",
    "FeaturesConfig",
    "ModelSource",
    "ModelsConfig",
    "PathsConfig",
    "RunConfig",
    "TrainConfig",
    "TINY_MODEL_ID",
    "available_presets",
    "config_from_dict",
    "fingerprint",
    "load_config",
]
