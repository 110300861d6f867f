"""CoBSAT mean accuracies reported by the papers (LLaVA-1.5-13B judge, all 1,000 prompts of each of
the 10 tasks), shown above the measured rows of comparison.md and .png, never mixed with them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedScore:
    system: str
    vlm: str
    mean: dict[int, float]
    """Mean accuracy over the 10 tasks per shot."""
    source: str


PUBLISHED = (
    PublishedScore("ThinkDiff-LVLM", "Qwen2-VL-7B", {2: 0.417, 4: 0.463}, "ThinkDiff, arXiv 2502.10458, Table 1"),
    PublishedScore("text bridge", "Qwen2-VL-7B", {2: 0.537, 4: 0.614}, "reported by TBDN, arXiv 2601.06169"),
    PublishedScore("text bridge", "Qwen2.5-VL-7B", {2: 0.312, 4: 0.395}, "reported by TBDN, arXiv 2601.06169"),
    PublishedScore("text bridge", "InternVL3-8B", {2: 0.586, 4: 0.713}, "reported by TBDN, arXiv 2601.06169"),
    PublishedScore("TBDN", "Qwen2-VL-7B", {2: 0.693, 4: 0.767}, "TBDN, arXiv 2601.06169"),
    PublishedScore("TBDN", "InternVL3-8B", {2: 0.683, 4: 0.769}, "TBDN, arXiv 2601.06169"),
)


def published_table(shots: list[int]) -> list[str]:
    """The published rows for these shots, as a markdown table under its own heading."""
    lines = ["Published (reported by the papers, not measured here):", "",
             "| system | VLM | shot | mean | source |", "|---|---|---|---|---|"]
    lines += [f"| {p.system} | {p.vlm} | {shot} | {p.mean[shot]:.3f} | {p.source} |"
              for p in PUBLISHED for shot in sorted(shots) if shot in p.mean]
    return lines
