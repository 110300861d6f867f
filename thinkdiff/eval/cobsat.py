"""CoBSAT (Zeng et al., arXiv 2402.01293): tasks, items, prompts, judge questions and scoring,
exactly as the public protocol and CoBSAT's code give them (docs/cobsat.md).

    thinkdiff cobsat prompts --task 1 --shot 2 --limit 3

A prompt (task, shot N, index i) takes entry i of 1000 seed-123 permutation pairs: the first N+1
entries of `x_list` are the demo and query x items, `theta_list[N+1]` the latent theta shared by
all demos and the query. Demo k is the text "{x_k}: " followed by the image of (x_k, theta); the
query is "{x_query}: " with no image; the expected image shows (x_query, theta).
"""

from __future__ import annotations

import random
import re
import typing
from dataclasses import dataclass
from functools import cache

# Option order matters: it is the judge's numbering 1..10.
ITEMS: dict[str, tuple[str, ...]] = {
    "color": ("yellow", "white", "red", "purple", "pink", "orange", "green", "brown", "blue", "black"),
    "object": ("leaf", "hat", "cup", "chair", "car", "box", "book", "ball", "bag", "apple"),
    "animal": ("zebra", "tiger", "sheep", "pig", "monkey", "lion", "dog", "cow", "cat", "bird"),
    "style": ("watercolor", "sketch", "pixel", "origami", "lego", "icon", "graffiti", "futuristic", "3d", "old"),
    "action": ("swim", "sleep", "sing", "run", "read", "fly", "eat", "drink", "cry", "angry"),
    "background": ("beach", "desert", "glacier", "volcano", "park", "gym", "waterfall", "space", "cave", "seafloor"),
    "texture": ("wood", "wicker", "sequined", "plastic", "paper", "metal", "leather", "lace", "denim", "ceramic"),
}
# File ids whose display word differs.
DISPLAY = {"3d": "wireframe", "park": "amusement park"}
NUM_PROMPTS = 1000
PROMPT_SEED = 123


def display(item: str) -> str:
    return DISPLAY.get(item, item)


@dataclass(frozen=True)
class Task:
    id: int
    name: str
    short: str
    attribute: str
    """The detail space (color, background, style, action, texture): the theme of the folder names."""
    object: str
    """The object space (object or animal)."""
    x_is_attribute: bool
    """-I tasks give the attribute as text and hide the object; -II tasks the reverse."""

    @property
    def theme(self) -> str:
        return f"{self.attribute}_{self.object}"

    @property
    def x_space(self) -> str:
        return self.attribute if self.x_is_attribute else self.object

    @property
    def theta_space(self) -> str:
        return self.object if self.x_is_attribute else self.attribute


TASKS: tuple[Task, ...] = (
    Task(1, "Color-I", "C-I", "color", "object", True),
    Task(2, "Color-II", "C-II", "color", "object", False),
    Task(3, "Background-I", "B-I", "background", "animal", True),
    Task(4, "Background-II", "B-II", "background", "animal", False),
    Task(5, "Style-I", "S-I", "style", "object", True),
    Task(6, "Style-II", "S-II", "style", "object", False),
    Task(7, "Action-I", "A-I", "action", "animal", True),
    Task(8, "Action-II", "A-II", "action", "animal", False),
    Task(9, "Texture-I", "T-I", "texture", "object", True),
    Task(10, "Texture-II", "T-II", "texture", "object", False),
)
# The papers' column order.
COLUMN_ORDER = (1, 3, 5, 7, 9, 2, 4, 6, 8, 10)


def get_task(key: int | str) -> Task:
    """A task by id (1..10), name (Color-I) or short name (C-I), case-insensitive."""
    for task in TASKS:
        if str(key).lower() in (str(task.id), task.name.lower(), task.short.lower()):
            return task
    raise ValueError(f"unknown CoBSAT task {key!r}; use 1..10 or one of {', '.join(t.name for t in TASKS)}")


@cache
def prompt_lists() -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """The 1000 (x_list, theta_list) permutation pairs: seed 123, each shuffle continuing the last."""
    rng = random.Random(PROMPT_SEED)
    x, theta = list(range(10)), list(range(10))
    pairs = []
    for _ in range(NUM_PROMPTS):
        rng.shuffle(x)
        rng.shuffle(theta)
        pairs.append((tuple(x), tuple(theta)))
    return tuple(pairs)


def image_path(task: Task, attribute: str, obj: str) -> str:
    """Relative path of one item image: datasets/{theme}_{object}/{attribute}_{object}.jpg."""
    return f"datasets/{task.attribute}_{obj}/{attribute}_{obj}.jpg"


@dataclass(frozen=True)
class Prompt:
    task: Task
    shot: int
    index: int
    theta: str
    x_items: tuple[str, ...]
    """N demo x items, then the query x item (file ids)."""

    @property
    def text_inputs(self) -> list[str]:
        return [f"{display(x)}: " for x in self.x_items]

    def pair(self, x: str) -> tuple[str, str]:
        """(attribute, object) file ids of the image showing x with this prompt's theta."""
        return (x, self.theta) if self.task.x_is_attribute else (self.theta, x)

    @property
    def image_inputs(self) -> list[str]:
        return [image_path(self.task, *self.pair(x)) for x in self.x_items[:-1]]

    @property
    def expected(self) -> tuple[str, str]:
        return self.pair(self.x_items[-1])

    @property
    def save_name(self) -> str:
        """CoBSAT's file name (without extension) for this prompt's generated image: the index, theta's
        file id, then the x items' display words, "_"-joined (so `0_car_wireframe_futuristic_icon`,
        `1_tiger_space_amusement park_volcano`): load_dataset.py line 102, with the x words mapped
        by item2word on line 24 and theta not (line 51), CoBSAT a787be5."""
        return f"{self.index}_{self.theta}_{'_'.join(display(x) for x in self.x_items)}"

    def to_json(self) -> dict:
        detail, obj = self.expected
        return {
            "index": self.index,
            "task": self.task.id,
            "shot": self.shot,
            "theta": self.theta,
            "text_inputs": self.text_inputs,
            "image_inputs": self.image_inputs,
            "expected_detail": detail,
            "expected_object": obj,
        }


def cobsat_result_path(prompt: Prompt, model: str) -> str:
    """Where CoBSAT's evaluation_icl.py reads the image generated for `prompt` by `model`, relative to
    its checkout: results/exps/{model}_image/shot_{N}/default/task_{id}/{save_name}.jpg (helper.py
    line 145, evaluation_icl.py lines 510-550, CoBSAT a787be5; "image" is the generation mode and
    "default" the prompt type, the benchmark's own prompts)."""
    if not model or "/" in model:
        raise ValueError(f"model={model!r}: give a folder-safe name (CoBSAT's --model), e.g. thinkdiff")
    return f"results/exps/{model}_image/shot_{prompt.shot}/default/task_{prompt.task.id}/{prompt.save_name}.jpg"


def build_prompt(task: Task, shot: int, index: int) -> Prompt:
    if not 1 <= shot <= 8:
        raise ValueError(f"shot={shot}: CoBSAT prompts have 1 to 8 demos "
                         "(N+1 distinct x items of 10, theta at N+1 <= 9)")
    if not 0 <= index < NUM_PROMPTS:
        raise ValueError(f"index={index}: CoBSAT has prompts 0..{NUM_PROMPTS - 1}")
    x_list, theta_list = prompt_lists()[index]
    x_items = tuple(ITEMS[task.x_space][k] for k in x_list[: shot + 1])
    return Prompt(task=task, shot=shot, index=index, theta=ITEMS[task.theta_space][theta_list[shot + 1]],
                  x_items=x_items)


def build_prompts(task: Task, shot: int, limit: int | None = None) -> list[Prompt]:
    """The first `limit` prompts of (task, shot) (None: all of them)."""
    if limit is not None and not 1 <= limit <= NUM_PROMPTS:
        raise ValueError(f"limit={limit}: give a prompt count in 1..{NUM_PROMPTS}, or none for all")
    return [build_prompt(task, shot, i) for i in range(limit or NUM_PROMPTS)]


# ---------------------------------------------------------------------------------------------
# Judging


class Verdict(typing.NamedTuple):
    """A judge's reading of one generated image: the (detail, object) options it chose (1..10, or -1
    when a reply names none) and its two raw replies, in question order (kept in results.jsonl)."""

    detail: int
    object: int
    replies: tuple[str, str]


def judge_questions(task: Task) -> tuple[str, str]:
    """The two exact questions (detail, object) asked about one generated image."""

    def options(space: str) -> str:
        return " ".join(f"({k + 1}){display(item)}" for k, item in enumerate(ITEMS[space]))

    tail = ". Answer the number only and do not include any other texts (e.g., 1)."
    detail = (f"What is the {task.attribute} (of the main object) in this image? "
              f"Answer from the following options:  {options(task.attribute)}{tail}")
    obj = f"What is the main object in this image? Answer from the following options:  {options(task.object)}{tail}"
    return detail, obj


def parse_answer(reply: str) -> int:
    """All digits of the reply concatenated, as an option number 1..10; anything else is -1."""
    digits = "".join(re.findall(r"\d", reply))
    if not digits:
        return -1
    value = int(digits)
    return value if 1 <= value <= 10 else -1


def is_correct(task: Task, prompt: Prompt, detail_option: int, object_option: int) -> bool:
    """Correct only if both answers name the expected items (options are 1-based)."""
    expected_detail, expected_object = prompt.expected
    return (
        detail_option == ITEMS[task.attribute].index(expected_detail) + 1
        and object_option == ITEMS[task.object].index(expected_object) + 1
    )
