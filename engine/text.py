"""The text of a sample that the text encoder and the skill prompt read.

PROGRESS embeds the human turns joined by newlines, cut before LLaVA's answer-format
suffixes ("\\nAnswer with ...", "\\nAnswer the ..."): the suffix says how to answer,
not what is asked, and would pull every short-answer question together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

IMAGE_TOKEN = "<image>"
ANSWER_FORMAT_MARKERS = ("\nAnswer with", "\nAnswer the")


def strip_answer_format(text: str) -> str:
    """``text`` cut before the first answer-format marker, image token removed, stripped."""
    text = text.replace(IMAGE_TOKEN, "")
    for marker in ANSWER_FORMAT_MARKERS:
        cut = text.find(marker)
        if cut != -1:
            text = text[:cut]
    return text.strip()


def instruction_text(conversations: Iterable[Mapping[str, str]]) -> str:
    """The human turns of a LLaVA conversation, each cleaned, joined by newlines.

    ``conversations`` is the pool's list of ``{"from", "value"}`` turns; the result is
    what the ``text`` space embeds and what the skill prompt asks about.
    """
    turns = (strip_answer_format(t["value"]) for t in conversations if t["from"] == "human")
    return "\n".join(t for t in turns if t)
