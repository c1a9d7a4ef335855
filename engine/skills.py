"""The skill-description prompt, the parser of its answers, and the skills stage's data contracts.

"Concepts or Skills?" (seeds/000) asks an LLM which *visual skills* a question needs
(counting, spatial relations, reading text, ...) and embeds the answer with MiniLM:
questions that need the same skills land together whatever their images show. This
module is the plain-Python half of that: the versioned few-shot prompt, the parser
that turns an answer into a normalised list of skill names (or a reason it cannot),
the text the ``skill`` embedding space embeds, and the cache key.

Versioning: ``PROMPT_VERSION`` names the prompt *and* the parser. Change either and
bump it: the cache key includes it, so old answers are never mixed with new ones.

Columns (Arrow schemas below):
    ``RESULT_SCHEMA``  one generated answer per unique question (what a backend returns):
        key, skills (list<string>, [] when failed), skill_text, raw (the model's text,
        null when no answer came back), status ("ok" | "failed"), reason (null when ok),
        attempts, prompt_tokens, completion_tokens.
    ``CACHE_SCHEMA``   ``<ws>/cache/skills/`` shards: successes only, keyed by ``key``.
    ``SKILLS_SCHEMA``  ``<ws>/skills/`` shards: one row per pool id.
"""

from __future__ import annotations

import hashlib
import json
import re

import pyarrow as pa

PROMPT_VERSION = "skills-v1"

# Bounds that keep one sample's prompt and answer small whatever the pool holds
# (LLaVA-665K has multi-turn conversations of several thousand characters).
MAX_QUESTION_CHARS = 1200
MAX_SKILLS = 8
MAX_SKILL_CHARS = 60
MAX_SKILL_WORDS = 6
SKILL_SEPARATOR = "; "

SYSTEM_PROMPT = (
    "You name the visual skills that answering a question about an image requires. "
    "Reply with 1 to 5 short skill names separated by commas, and nothing else."
)

# Few-shot pairs in the style of LLaVA-665K questions; the skill names reuse a small
# vocabulary so that similar questions get the same words (the embedding compares
# words, so a consistent vocabulary is what makes neighbours meaningful).
FEW_SHOT: tuple[tuple[str, str], ...] = (
    ("How many people are sitting on the bench?", "object counting, object recognition"),
    ("What color is the car on the left of the bus?", "color recognition, spatial relations"),
    ("What is written on the red sign?", "text reading (OCR), color recognition"),
    ("Is there a dog in the image?", "object existence, object recognition"),
    ("Are there more apples than oranges on the table?", "object counting, quantity comparison"),
    ("What is the total price of the two items on the menu?", "text reading (OCR), arithmetic"),
    ("Which city is this landmark in?", "landmark recognition, world knowledge"),
    ("Is the cup bigger than the plate?", "size comparison, object recognition"),
)

RESULT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("skills", pa.list_(pa.string()), nullable=False),
        pa.field("skill_text", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("prompt_tokens", pa.int64(), nullable=False),
        pa.field("completion_tokens", pa.int64(), nullable=False),
    ]
)
CACHE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("skills", pa.list_(pa.string()), nullable=False),
        pa.field("skill_text", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
    ]
)
SKILLS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("skills", pa.list_(pa.string()), nullable=False),
        pa.field("skill_text", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
    ]
)


class UnparseableSkills(ValueError):
    """An answer holds no usable skill names; ``reason`` says why in one sentence."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def clip_question(question_text: str) -> str:
    """The question as the prompt shows it: at most ``MAX_QUESTION_CHARS``, cut at a word."""
    text = question_text.strip()
    if len(text) <= MAX_QUESTION_CHARS:
        return text
    return text[:MAX_QUESTION_CHARS].rsplit(" ", 1)[0] + " ..."


def build_messages(question_text: str) -> list[dict[str, str]]:
    """Chat messages for one question: system, the few-shot pairs as turns, then the question.

    Few-shot pairs go in as real user/assistant turns rather than inside the system
    text: small instruction models copy the *format* of earlier assistant turns far
    more reliably than they follow a described format.
    """
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for question, skills in FEW_SHOT:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": skills})
    messages.append({"role": "user", "content": clip_question(question_text)})
    return messages


_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i can not|i'?m unable|i am unable|"
    r"as an ai|i do not have|i don'?t have|unfortunately)",
    re.IGNORECASE,
)
_THINK = re.compile(r"<think>.*?(</think>|$)", re.IGNORECASE | re.DOTALL)
_LEAD_IN = re.compile(
    r"^\s*(the\s+)?(visual\s+)?(skills?|answer)(\s+(needed|required))?\s*(are|is|:|-)\s*",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*(?:[-*•·>#]+|\(?\d{1,2}[.)\]:]|\(?[a-z][.)](?=\s))\s*")
_SPLIT = re.compile(r"[\n,;|•]+")
_EDGE = "\"'`*_ \t.:!?-–—“”‘’[]{}"


def _clean_item(item: str) -> str:
    # To a fixpoint, so that a cleaned item cleans to itself (stripping a quote can
    # expose a bullet, lowercasing can expose whitespace).
    for _ in range(32):
        before = item
        item = _BULLET.sub("", item)
        item = item.replace("**", "").replace("`", "")
        item = " ".join(item.split()).strip(_EDGE).lower()
        # An unbalanced bracket left by splitting "reading (OCR, signs)" reads as noise.
        if item.count("(") != item.count(")"):
            item = item.replace("(", "").replace(")", "")
        if item == before:
            break
    return item


def parse_skills(raw: object) -> list[str]:
    """Normalised skill names from one answer, in order of appearance.

    Lowercased; bullets, numbering, quotes, markdown and trailing punctuation
    stripped; split on newlines, commas, semicolons and pipes; a lead-in such as
    "Skills:" dropped; duplicates removed (first kept); items that read as sentences
    (more than ``MAX_SKILL_WORDS`` words or ``MAX_SKILL_CHARS`` characters) or hold no
    letter dropped; at most ``MAX_SKILLS`` kept.

    Raises:
        UnparseableSkills: the answer is not text, is empty, is a refusal, or holds
            no item that passes the rules above; ``reason`` says which.
    """
    if not isinstance(raw, str):
        raise UnparseableSkills(f"answer is not text (got {type(raw).__name__})")
    text = _THINK.sub("", raw).strip()
    if not text:
        raise UnparseableSkills("empty answer")
    if _REFUSAL.match(text):
        raise UnparseableSkills(f"the model refused: {text[:80]!r}")
    text = _LEAD_IN.sub("", text, count=1)
    skills: list[str] = []
    for piece in _SPLIT.split(text):
        item = _clean_item(piece)
        if (
            not item
            or len(item) > MAX_SKILL_CHARS
            or len(item.split()) > MAX_SKILL_WORDS
            or not any(c.isalpha() for c in item)
            or item in skills
        ):
            continue
        skills.append(item)
        if len(skills) == MAX_SKILLS:
            break
    if not skills:
        raise UnparseableSkills(f"no skill names in the answer: {text[:80]!r}")
    return skills


def try_parse_skills(raw: object) -> tuple[list[str], str | None]:
    """``(skills, None)`` when ``raw`` parses, else ``([], reason)``; never raises."""
    try:
        return parse_skills(raw), None
    except UnparseableSkills as err:
        return [], err.reason


def skill_text(skills: list[str]) -> str:
    """The string the embed stage embeds into the ``skill`` space: names joined by '; '."""
    return SKILL_SEPARATOR.join(skills)


def cache_key(question_text: str, prompt_version: str, model_id: str) -> str:
    """sha256 hex of (question, prompt version, model): equal keys get the same answer.

    Generation is greedy, so these three decide the answer; the question is taken
    as the prompt shows it (``clip_question``), so questions differing only past
    the cut share one key.
    """
    payload = json.dumps([clip_question(question_text), prompt_version, model_id])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def result_row(
    key: str,
    raw: str | None,
    *,
    error: str | None = None,
    attempts: int = 1,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> dict:
    """One ``RESULT_SCHEMA`` row: parses ``raw`` unless ``error`` already says it failed."""
    if error is None:
        skills, error = try_parse_skills(raw)
    else:
        skills = []
    return {
        "key": key,
        "skills": skills,
        "skill_text": skill_text(skills) if skills else None,
        "raw": raw,
        "status": "failed" if error else "ok",
        "reason": error,
        "attempts": attempts,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
