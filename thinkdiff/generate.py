"""Image generation: interleaved images and text -> VLM -> aligner -> FLUX (docs/method.md, Inference).

    thinkdiff generate --config tiny --text "red: " --image a.jpg --text "blue: " --out out.png
    thinkdiff compose --config tiny-clip --image dog.jpg --image style.jpg --text "on a beach" --out out.png

CoBSAT prompts go in batches of `eval.batch_size` (one VLM generate() and one FLUX call each).
The VLM answers each prompt with exactly `eval.gen_tokens` sampled tokens, every stop token banned
(as the official release samples: vLLM with min_tokens = max_tokens and ignore_eos); the
final-norm states that produced them go through the aligner and become FLUX's `prompt_embeds`,
with the pooled CLIP embedding of "". The text-bridge baseline instead lets the VLM write a prompt
(stopping at EOS) and FLUX draw that text through its own encoders. Both keep what the VLM was
given and what it said (`Drawing`), so every CoBSAT result can be read back.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from thinkdiff.config import RunConfig
from thinkdiff.eval.cobsat import Prompt, display
from thinkdiff.eval.dataset import CobsatDataset
from thinkdiff.eval.harness import Drawing
from thinkdiff.models.aligner import Aligner, import_official_checkpoint
from thinkdiff.models.common import shared
from thinkdiff.models.flux import Flux, load_flux
from thinkdiff.models.vision import VisionEncoder, load_vision
from thinkdiff.models.vlm import (
    VLM,
    GeneratedSample,
    PromptPart,
    encode_chat,
    generate_with_states,
    load_vlm,
    render_chat,
    with_pixel_limits,
)

log = logging.getLogger(__name__)

# The instruction ThinkDiff gives Qwen2-VL before the CoBSAT words and pictures (the official
# release's scripts/test/test_mllama_t5_decoder_flux_multi_image.py at 3ed85e6; docs/fidelity.md).
COBSAT_INSTRUCTION = (
    "I give you several words and pictures. First, please analyse what the next picture is. Then give me a "
    "detailed diffusion prompt to describe the next picture. Please only provide me the detailed prompt and "
    "start the answer with 'Create an image'.\n\n"
)


def cobsat_parts(prompt: Prompt, dataset: CobsatDataset) -> list[PromptPart]:
    """The VLM's user turn: instruction, then "Word k: {x}, " + demo image ..., the query word last."""
    parts: list[PromptPart] = [COBSAT_INSTRUCTION]
    for k, x in enumerate(prompt.x_items):
        parts.append(f"{'' if k == 0 else chr(10) * 2}Word {k + 1}: {display(x)}, ")
        if k < len(prompt.x_items) - 1:
            parts.append(dataset.item(prompt.task, *prompt.pair(x)))
    return parts


# TBDN's sampling (arXiv 2601.06169; github.com/Calendula597/TBDN): the VLM writes the prompt with
# temperature 0.7 and top_p 0.9, at most 128 new tokens, stopping at EOS.
TBDN_TEMPERATURE, TBDN_TOP_P, TBDN_MAX_NEW_TOKENS = 0.7, 0.9, 128


def tbdn_parts(prompt: Prompt, dataset: CobsatDataset, hint: str) -> list[PromptPart]:
    """`cobsat_parts` with TBDN's hint sentence after the instruction (none when `hint` is empty)."""
    parts = cobsat_parts(prompt, dataset)
    if hint:
        parts[0] = f"{COBSAT_INSTRUCTION.rstrip()} {hint}\n\n"
    return parts


def load_aligner_spec(spec: str, cfg: RunConfig) -> Aligner:
    """An aligner from a directory, an official `.pth`, or `models:/name@alias` / `models:/name/N`."""
    if spec.endswith((".pth", ".pt")):
        with tempfile.TemporaryDirectory() as tmp:
            return Aligner.from_pretrained(import_official_checkpoint(spec, Path(tmp) / "aligner"))
    from thinkdiff.registry import Registry

    return Registry(cfg).load_aligner(spec)


def load_matching_aligner(spec: str, cfg: RunConfig, *, in_dim: int, out_dim: int, source: str) -> Aligner:
    """`load_aligner_spec`, checked against the feature model's width and FLUX's prompt width."""
    aligner = load_aligner_spec(spec, cfg)
    if (aligner.config.in_dim, aligner.config.out_dim) != (in_dim, out_dim):
        raise ValueError(
            f"aligner {spec} maps {aligner.config.in_dim} -> {aligner.config.out_dim}, but {source} has width {in_dim} "
            f"and models.flux expects {out_dim}: use an aligner trained for these models"
        )
    return aligner


def vlm_answers(vlm: VLM, cfg: RunConfig, conversations: list[list[PromptPart]], *, seed: int,
                ban_eos: bool = False) -> list[GeneratedSample]:
    """The VLM's sampled answers to a batch of chats, with eval's sampling settings and picture labels
    and the features stage's KV cache and compile settings."""
    e, f = cfg.eval, cfg.features
    batch = encode_chat(vlm, conversations, f.system_prompt, picture_labels=e.picture_labels)
    return generate_with_states(vlm, batch, max_new_tokens=e.gen_tokens, temperature=e.temperature, top_p=e.top_p,
                                seed=seed, ban_eos=ban_eos, kv_cache=f.kv_cache, compile=f.compile)


def vlm_drawings(vlm: VLM, cfg: RunConfig, conversations: list[list[PromptPart]], samples: list[GeneratedSample],
                 images: list[Image.Image]) -> list[Drawing]:
    """Each image with the chat the VLM was given (one placeholder per image) and its whole answer,
    special tokens kept."""
    return [Drawing(image,
                    vlm_prompt=render_chat(conv, cfg.features.system_prompt, picture_labels=cfg.eval.picture_labels),
                    vlm_text=vlm.tokenizer.decode(sample.token_ids, skip_special_tokens=False))
            for conv, sample, image in zip(conversations, samples, images, strict=True)]


@dataclass
class ThinkDiffGenerator:
    """ThinkDiff: the aligned states of the VLM's answer are FLUX's prompt embedding, with the pooled
    CLIP embedding of "". With `hybrid`, FLUX's own T5 embedding of the text of that same answer
    follows the aligned tokens (padded to `eval.clip_text_tokens`, as ThinkDiff-CLIP appends its text),
    and the pooled CLIP embedding is that text's."""

    vlm: VLM
    aligner: Aligner
    flux: Flux
    cfg: RunConfig
    hybrid: bool = False

    def __post_init__(self) -> None:
        self.aligner.to(self.flux.device).eval()
        self.pooled = self.flux.pooled_clip("")

    @torch.no_grad()
    def conditioning(self, conversations: list[list[PromptPart]], *,
                     vlm_seed: int) -> tuple[torch.Tensor, torch.Tensor, list[GeneratedSample]]:
        """FLUX's (B, L, D) prompt embeddings and (B or 1, D_clip) pooled embeddings for a batch of chats,
        from one VLM call (sampled with `vlm_seed`), and that call's answers."""
        samples = vlm_answers(self.vlm, self.cfg, conversations, seed=vlm_seed, ban_eos=True)
        states_BLD = torch.stack([s.states_LD for s in samples]).float().to(self.flux.device)
        aligned_BLD = self.aligner(states_BLD)
        if not self.hybrid:
            return aligned_BLD, self.pooled, samples
        texts = [self.vlm.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        text_BTD, pooled_BD, _ = self.flux.pipe.encode_prompt(prompt=texts, prompt_2=texts, device=self.flux.device,
                                                              max_sequence_length=self.cfg.eval.clip_text_tokens)
        return torch.cat([aligned_BLD.to(text_BTD.dtype), text_BTD], dim=1), pooled_BD, samples

    @torch.no_grad()
    def draw(self, conversations: list[list[PromptPart]], *, vlm_seed: int, flux_seeds: list[int]) -> list[Drawing]:
        """One image per conversation; the VLM samples the whole batch with `vlm_seed`, FLUX draws row i
        from the noise of `flux_seeds[i]` (so a row's picture does not depend on its batch)."""
        e = self.cfg.eval
        embeds_BLD, pooled, samples = self.conditioning(conversations, vlm_seed=vlm_seed)
        images = self.flux.draw_embeds(embeds_BLD, pooled, steps=e.steps, guidance=e.guidance, size=e.image_size,
                                       seeds=flux_seeds)
        return vlm_drawings(self.vlm, self.cfg, conversations, samples, images)

    def __call__(self, prompts: list[Prompt], dataset: CobsatDataset) -> list[Drawing]:
        seed = self.cfg.eval.seed
        return self.draw([cobsat_parts(p, dataset) for p in prompts], vlm_seed=seed + prompts[0].index,
                         flux_seeds=[seed + p.index for p in prompts])


@dataclass
class TextBridgeGenerator:
    """Baseline: the VLM writes a prompt with the same instruction; FLUX draws it with its own encoders."""

    vlm: VLM
    flux: Flux
    cfg: RunConfig

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], dataset: CobsatDataset) -> list[Drawing]:
        e = self.cfg.eval
        conversations = [cobsat_parts(p, dataset) for p in prompts]
        samples = vlm_answers(self.vlm, self.cfg, conversations, seed=e.seed + prompts[0].index)
        texts = [self.vlm.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        images = self.flux.draw_text(texts, steps=e.steps, guidance=e.guidance, size=e.image_size,
                                     seeds=[e.seed + p.index for p in prompts])
        return vlm_drawings(self.vlm, self.cfg, conversations, samples, images)


@dataclass
class TBDNGenerator:
    """TBDN's training-free bridge: the text bridge with a hint in the instruction and query-contrastive
    decoding (each prompt decoded beside itself without its final query text, `eval.tbdn_alpha`)."""

    vlm: VLM
    flux: Flux
    cfg: RunConfig

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], dataset: CobsatDataset) -> list[Drawing]:
        e, f = self.cfg.eval, self.cfg.features
        conversations = [tbdn_parts(p, dataset, e.tbdn_hint) for p in prompts]
        without_query = [conv[:-1] for conv in conversations]  # the query word is the last text part
        batch = encode_chat(self.vlm, conversations + without_query, f.system_prompt, picture_labels=e.picture_labels)
        samples = generate_with_states(self.vlm, batch, max_new_tokens=TBDN_MAX_NEW_TOKENS,
                                       temperature=TBDN_TEMPERATURE, top_p=TBDN_TOP_P, seed=e.seed + prompts[0].index,
                                       compile=f.compile, contrast=e.tbdn_alpha)
        texts = [self.vlm.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        images = self.flux.draw_text(texts, steps=e.steps, guidance=e.guidance, size=e.image_size,
                                     seeds=[e.seed + p.index for p in prompts])
        return vlm_drawings(self.vlm, self.cfg, conversations, samples, images)


def inference_vlm(cfg: RunConfig) -> VLM:
    """The VLM as CoBSAT inference uses it: the features stage's model (held once per process), its
    images resized to `eval.min_pixels`..`eval.max_pixels`."""
    f, e = cfg.features, cfg.eval
    return with_pixel_limits(shared(load_vlm, cfg.models.vlm, min_pixels=f.min_pixels, max_pixels=f.max_pixels),
                             e.min_pixels, e.max_pixels)


def build_generator(cfg: RunConfig, aligner_spec: str | None):
    """The model-backed generator named by `eval.generator` (thinkdiff, hybrid, text-bridge or tbdn)."""
    vlm = inference_vlm(cfg)
    flux = shared(load_flux, cfg.models.flux, compile=cfg.eval.compile)
    if cfg.eval.generator == "text-bridge":
        return TextBridgeGenerator(vlm=vlm, flux=flux, cfg=cfg)
    if cfg.eval.generator == "tbdn":
        return TBDNGenerator(vlm=vlm, flux=flux, cfg=cfg)
    if not aligner_spec:
        raise ValueError(f"eval.generator={cfg.eval.generator} needs an aligner: "
                         "a directory, an official .pth or models:/name@alias")
    aligner = load_matching_aligner(aligner_spec, cfg, in_dim=vlm.hidden_size, out_dim=flux.joint_dim,
                                    source="models.vlm")
    return ThinkDiffGenerator(vlm=vlm, aligner=aligner, flux=flux, cfg=cfg, hybrid=cfg.eval.generator == "hybrid")


@dataclass
class Composer:
    """ThinkDiff-CLIP inference: `prompt_embeds = [aligner(img_1) ; ... ; FLUX's T5 embedding of the
    text]`, pooled CLIP from the text (or ""). The text goes through FLUX's T5 at
    `eval.clip_text_tokens` (the release: 128), padded to that length, also when it is empty."""

    vision: VisionEncoder
    aligner: Aligner
    flux: Flux
    cfg: RunConfig

    def __post_init__(self) -> None:
        self.aligner.to(self.flux.device).eval()

    @torch.no_grad()
    def prompt_embeds(self, images: list[Image.Image], text: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, n_images * T + eval.clip_text_tokens, D) prompt embeddings and the (1, D_clip) pooled embedding."""
        tokens_BTD = self.vision.tokens(images).to(self.flux.device)
        aligned_1ND = self.aligner(tokens_BTD).reshape(1, -1, self.aligner.config.out_dim).to(self.flux.dtype)
        text = text or ""
        text_1LD, pooled, _ = self.flux.pipe.encode_prompt(prompt=text, prompt_2=text, device=self.flux.device,
                                                           max_sequence_length=self.cfg.eval.clip_text_tokens)
        return torch.cat([aligned_1ND, text_1LD.to(aligned_1ND.dtype)], dim=1), pooled

    def compose(self, images: list[Image.Image], text: str | None, seed: int) -> Image.Image:
        e = self.cfg.eval
        embeds, pooled = self.prompt_embeds(images, text)
        return self.flux.draw_embeds(embeds, pooled, steps=e.steps, guidance=e.guidance, size=e.image_size,
                                     seeds=[seed])[0]


def build_composer(cfg: RunConfig, aligner_spec: str) -> Composer:
    vision = shared(load_vision, cfg.models.vision, image_size=cfg.features.vision_image_size)
    flux = shared(load_flux, cfg.models.flux, compile=False)
    aligner = load_matching_aligner(aligner_spec, cfg, in_dim=vision.hidden_size, out_dim=flux.joint_dim,
                                    source="models.vision")
    return Composer(vision=vision, aligner=aligner, flux=flux, cfg=cfg)
