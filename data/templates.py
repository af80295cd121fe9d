"""Instruction templates per task (PAPER.md §4.3, App. Tab. 20-23, verbatim) and the answers that
carry the task tokens.

`{query}` / `{expr}` / `{obj}` are filled with `Record.question`; the tracking templates hold the
`<track_box>` token where the paper writes ⟨track box⟩ (its embedding is replaced by
`loc_encoder(box)`). A template is picked deterministically from a seed (`pick`).
"""

from __future__ import annotations

import numpy as np

from tpo_jax.tokenizer import BOX_BEGIN, BOXES, TEMP, TIME_BEGIN, TRACK_BEGIN, TRACK_BOX, TRACKING

# Composite templates used in training targets (a task token follows its begin token).
ATBOXES_PLACEHOLDER = BOX_BEGIN + BOXES
ATTEMP_PLACEHOLDER = TIME_BEGIN + TEMP
ATTRACK_PLACEHOLDER = TRACK_BEGIN + TRACKING

TEMPORAL = (  # Tab. 20
    "Localize the visual content described by the given textual query '{query}' in the video, and output the "
    "start and end timestamps in seconds.",
    "Detect and report the start and end timestamps of the video segment that semantically matches the given "
    "textual query '{query}'.",
    "Locate and describe the visual content mentioned in the text query '{query}' within the video, including "
    "timestamps.",
    "The given natural language query '{query}' is semantically aligned with a video moment, please give the "
    "start time and end time of the video moment.",
    "Find the video segment that corresponds to the given textual query '{query}' and determine its start and "
    "end seconds.",
)

TRACKING = tuple(t.replace("⟨track box⟩", TRACK_BOX) for t in (  # Tab. 21
    "Track the object in the video using a box with initial coordinates ⟨track box⟩.",
    "Use a bounding box with coordinates ⟨track box⟩ to follow the movement of the moving object in the visual "
    "input.",
    "Given an initial bounding box with coordinates ⟨track box⟩, track the motion of the target object in the "
    "sequence of frames.",
    "Starting from the box defined by the coordinates ⟨track box⟩, monitor the movement of the object in the "
    "video.",
    "Utilizing the initial box specified by the coordinates ⟨track box⟩, continuously track and update the "
    "location of the object in the video stream.",
    "Given a video with an object of interest enclosed in a bounding box with coordinates ⟨track box⟩, generate "
    "a sequence of bounding boxes that track the object's movement.",
    "With an initial box defined by ⟨track box⟩, trace the object's trajectory by generating a sequence of "
    "bounding boxes that follow the object's movement in the visual input.",
    "Apply an object tracking algorithm to a video, starting with a bounding box defined by ⟨track box⟩.",
    "Given a video and an initial bounding box defined by ⟨track box⟩, track the movement of the object within "
    "the video.",
    "Starting from an initial box defined by ⟨track box⟩, track the movement of the object in the visual input.",
))

REGION = (  # Tab. 22
    "Where is {expr}?", "Can you find {expr}?", "Can you detect {expr}?", "Can you locate {expr}?",
    "Please find {expr}.", "Please detect {expr}?", "Please locate {expr}?", "Find {expr}.", "Detect {expr}?",
    "Locate {expr}?",
)

REFERRING = (  # Tab. 23
    "Please give the motion path of {obj} in the video over time.",
    "Show the tracking trajectory of {obj}'s movement through the scene in the video.",
    "Please generate a motion path of {obj}'s movement in the video, highlighting its tracking trajectory.",
    "Show the tracking trajectory of {obj}.",
    "Generate {obj}'s tracking trajectory.",
    "Visualize the tracking trajectory of {obj} in the video.",
    "Please generate a visual representation of {obj}'s movement in the video, highlighting its tracking "
    "trajectory.",
)

#: The answer of a task record: the begin token followed by the token whose hidden state feeds the head.
TASK_ANSWERS = {"region": ATBOXES_PLACEHOLDER, "temporal": ATTEMP_PLACEHOLDER, "mask": ATTRACK_PLACEHOLDER}

#: Multiple choice, in the released model's MVBench form (MODEL-SPEC §4.3, answer prompt "Best Option: ("):
#: options are listed as "(A) text" lines and the answer is "(B) text". The letter follows "(" in both, so
#: it is the same token ("B", not "▁B") in the option list and in the answer: emitting the right letter is
#: copying a token of the prompt, not mapping one token onto another.
OPTION_LETTERS = "ABCDEFGH"


def pick(templates: tuple[str, ...], seed: int) -> str:
    """The template chosen by `seed` (uniform over the tuple, stable across runs and platforms)."""
    return templates[int(np.random.default_rng([int(seed), len(templates)]).integers(len(templates)))]


def capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def task_instruction(task: str, question: str, seed: int) -> str:
    """The user instruction of a region / temporal / mask record.

    mask: an empty `question` means tracking (a Tab. 21 template with `<track_box>`); a question that
    already holds `<track_box>` is used verbatim; otherwise it names the object (Tab. 23).
    """
    if task == "temporal":
        return pick(TEMPORAL, seed).format(query=question)
    if task == "region":
        return pick(REGION, seed).format(expr=question)
    if task == "mask":
        if not question:
            return pick(TRACKING, seed)
        if TRACK_BOX in question:
            return question
        return capitalized(pick(REFERRING, seed).format(obj=question))
    raise ValueError(f"task {task!r} has no instruction templates")


def mc_question(question: str, options: tuple[str, ...]) -> str:
    """The question followed by one "(X) option" line per option."""
    lines = [f"({OPTION_LETTERS[i]}) {o}" for i, o in enumerate(options)]
    return question + "\nOptions:\n" + "\n".join(lines)


def mc_answer_text(options: tuple[str, ...], index: int) -> str:
    """The answer of a multiple-choice question: "(X) option"."""
    return f"({OPTION_LETTERS[index]}) {options[index]}"
