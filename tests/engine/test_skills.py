"""The skill prompt, the answer parser and the cache key (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.skills import (
    CACHE_SCHEMA,
    FEW_SHOT,
    MAX_QUESTION_CHARS,
    MAX_SKILL_CHARS,
    MAX_SKILL_WORDS,
    MAX_SKILLS,
    PROMPT_VERSION,
    RESULT_SCHEMA,
    SKILLS_SCHEMA,
    UnparseableSkills,
    build_messages,
    cache_key,
    parse_skills,
    result_row,
    skill_text,
    try_parse_skills,
)
from engine.text import instruction_text


def test_messages_are_system_then_few_shot_turns_then_the_question():
    messages = build_messages("How many cubes are there?")
    assert messages[0]["role"] == "system"
    roles = [m["role"] for m in messages[1:]]
    assert roles == ["user", "assistant"] * len(FEW_SHOT) + ["user"]
    assert messages[-1]["content"] == "How many cubes are there?"
    # Every few-shot answer must itself parse: the examples teach the format.
    for _, answer in FEW_SHOT:
        assert parse_skills(answer)


def test_few_shot_covers_the_llava_skill_families():
    answers = " ".join(a for _, a in FEW_SHOT)
    for skill in ("counting", "spatial", "color", "ocr", "comparison", "existence", "arithmetic"):
        assert skill in answers.lower(), skill
    assert "world knowledge" in answers


def test_long_questions_are_clipped_in_the_prompt():
    question = "word " * 1000
    content = build_messages(question)[-1]["content"]
    assert len(content) <= MAX_QUESTION_CHARS + 4
    assert content.endswith(" ...")


def test_question_text_from_a_conversation():
    conv = [
        {"from": "human", "value": "<image>\nWhat colour is the star?\nAnswer with one word."},
        {"from": "gpt", "value": "red"},
    ]
    assert build_messages(instruction_text(conv))[-1]["content"] == "What colour is the star?"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("object counting, object recognition", ["object counting", "object recognition"]),
        ("1. Counting\n2. Spatial reasoning.\n3. counting", ["counting", "spatial reasoning"]),
        ("Skills: color recognition; OCR", ["color recognition", "ocr"]),
        ("- **Text reading (OCR)**\n- Arithmetic!", ["text reading (ocr)", "arithmetic"]),
        ('"counting", "comparison"', ["counting", "comparison"]),
        ("The skills needed are: counting, size comparison.", ["counting", "size comparison"]),
        ("<think>let me see</think>object existence", ["object existence"]),
        ("• color recognition • shape recognition", ["color recognition", "shape recognition"]),
        ("1) counting\n2) counting\n3) COUNTING", ["counting"]),
    ],
)
def test_parse_normalises(raw, expected):
    assert parse_skills(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty answer"),
        ("   \n ", "empty answer"),
        (None, "not text"),
        (17, "not text"),
        ("I'm sorry, but I cannot see images.", "refused"),
        ("As an AI language model, I can't", "refused"),
        ("The answer is 10.", "no skill names"),
        ("1. 2. 3.", "no skill names"),
        (
            "To answer this you would need to look very carefully at the whole picture.",
            "no skill names",
        ),
    ],
)
def test_unparseable_answers_say_why(raw, reason):
    with pytest.raises(UnparseableSkills) as err:
        parse_skills(raw)
    assert reason in err.value.reason
    assert try_parse_skills(raw) == ([], err.value.reason)


def test_caps_count_and_length():
    raw = ", ".join(f"skill number {chr(97 + i)}" for i in range(20))
    skills = parse_skills(raw)
    assert len(skills) == MAX_SKILLS
    assert skills[0] == "skill number a"
    assert parse_skills("x" * 200 + ", counting") == ["counting"]


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30)).map(
            lambda items: st_join(items)
        ),
        st.none(),
        st.integers(),
    )
)
def test_parse_fuzz_gives_a_clean_list_or_a_reason(raw):
    try:
        skills = parse_skills(raw)
    except UnparseableSkills as err:
        assert isinstance(err.reason, str) and err.reason
        return
    assert 1 <= len(skills) <= MAX_SKILLS
    assert len(set(skills)) == len(skills)
    for skill in skills:
        assert skill == skill.lower() == skill.strip()
        assert 0 < len(skill) <= MAX_SKILL_CHARS
        assert len(skill.split()) <= MAX_SKILL_WORDS
        assert any(c.isalpha() for c in skill)
        assert not set(skill) & set(",;\n|")
    # Parsing is idempotent through the embedded text.
    assert parse_skills(", ".join(skills)) == skills


def st_join(items: list[str]) -> str:
    seps = [", ", "\n- ", "; ", "\n1. "]
    return "".join(f"{seps[i % len(seps)]}{item}" for i, item in enumerate(items))


def test_skill_text_and_cache_key():
    assert skill_text(["counting", "spatial relations"]) == "counting; spatial relations"
    key = cache_key("How many?", PROMPT_VERSION, "smollm2")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == cache_key("How many?", PROMPT_VERSION, "smollm2")
    assert key != cache_key("How many?", "skills-v0", "smollm2")
    assert key != cache_key("How many?", PROMPT_VERSION, "other-model")
    assert key != cache_key("How many??", PROMPT_VERSION, "smollm2")
    long_q = "word " * 1000
    assert cache_key(long_q, "v", "m") == cache_key(long_q + "tail", "v", "m")


def test_result_rows_fit_the_schemas():
    ok = result_row("k1", "counting, ocr", prompt_tokens=10, completion_tokens=4)
    bad = result_row("k2", "sorry, I cannot", attempts=3)
    err = result_row("k3", None, error="HTTP 500: boom", attempts=3)
    assert ok["status"] == "ok" and ok["reason"] is None and ok["skill_text"] == "counting; ocr"
    assert bad["status"] == "failed" and "refused" in bad["reason"] and bad["skills"] == []
    assert err["status"] == "failed" and err["reason"] == "HTTP 500: boom" and err["raw"] is None
    table = pa.Table.from_pylist([ok, bad, err], schema=RESULT_SCHEMA)
    assert table.num_rows == 3
    assert {"key", "skills", "skill_text", "raw"} <= set(CACHE_SCHEMA.names)
    assert SKILLS_SCHEMA.names[:2] == ["id", "skills"]


@pytest.mark.parametrize("name", ["skills-openai.yaml", "skills-vllm.yaml", "skills-vllm-cpu.yaml"])
def test_example_configs_validate(name):
    from pathlib import Path

    from engine.config import build_config, load_yaml_file
    from engine.skills_config import SkillsConfig

    path = Path(__file__).resolve().parents[2] / "configs" / name
    assert "vlselect skills" in path.read_text().splitlines()[0]
    cfg = build_config("skills", SkillsConfig, load_yaml_file(path))
    assert cfg.backend in name and cfg.model
