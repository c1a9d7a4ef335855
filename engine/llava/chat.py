"""Whole conversations through the checkpoint's own chat template, labels on the
assistant's tokens only (LLaVA's masking).

An example is a mapping with ``image`` (encoded bytes, a uint8 (H, W, 3) array, or None
for a text-only sample) and ``conversations``, LLaVA's list of ``{"from", "value"}``
turns (``human``/``gpt``/``system``; the ``<image>`` token marks the turn that carries
the image, else the first human turn does). A mapping with ``question`` and ``answer``
instead is one exchange. Every assistant turn is trained; an assistant turn is followed
by the tokenizer's eos (LLaVA-1.5 ends each answer with ``</s>``; llava-hf's template
renders none, so it is inserted), and the eos is a label too, so the model learns to stop.

The template is rendered once per conversation; the assistant spans are found by
rendering each prefix (messages before an assistant turn, with the generation prompt),
which works for any template whose renders of prefixes are prefixes of the whole
(every chat template seen: llava-hf's ``USER: <image>\\n... ASSISTANT: ...``, Vicuna,
Llama, ChatML). The whole text is then tokenized once with offsets, so the ids are those
the model meets at inference, not a concatenation of separately tokenized pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE = -100
IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}  # fmt: skip

# llava-hf/llava-1.5-*-hf's chat template, also saved with the tiny world base, so that
# the tiny model is prompted exactly as LLaVA-1.5 is.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass
class Encoded:
    """One tokenized conversation: ids and labels int lists of equal length (IGNORE
    outside assistant tokens); ``image_at`` the first image placeholder's index or -1."""

    ids: list[int]
    labels: list[int]
    image_at: int


def turns_of(example: Mapping[str, Any], with_answers: bool = True) -> list[dict]:
    """The example's turns: its ``conversations``, or its question and answer as one
    exchange (no answer turn when the answer is None or ``with_answers`` is False)."""
    turns = example.get("conversations")
    if turns is None:
        turns = [{"from": "human", "value": example["question"]}]
        if with_answers and example.get("answer") is not None:
            turns.append({"from": "gpt", "value": example["answer"]})
    return list(turns)


def first_answer(example: Mapping[str, Any]) -> str:
    """The reference of the first exchange: what the accuracy metric judges against."""
    if example.get("answer") is not None:
        return str(example["answer"])
    for turn in example["conversations"]:
        if ROLES.get(turn["from"]) == "assistant":
            return str(turn["value"])
    raise ValueError(f"example {example.get('id', '?')} has no answer turn")


def to_messages(turns: Sequence[Mapping[str, str]], has_image: bool) -> list[dict]:
    """LLaVA turns -> chat messages with typed content (llava-hf's template renders plain
    string content as nothing). The image goes to the turn that held ``<image>`` (else the
    first human turn); the token itself is removed from the text."""
    messages, image_turn = [], None
    for i, turn in enumerate(turns):
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(
                f"turn {i} is from {turn.get('from')!r}; expected one of {list(ROLES)}"
            )
        value = str(turn.get("value") or "")
        if IMAGE in value and image_turn is None:
            image_turn = i
        messages.append({"role": role, "content": [{"type": "text", "text": _clean(value)}]})
    if has_image:
        if image_turn is None:
            image_turn = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if image_turn is None:
            raise ValueError("a sample with an image needs a human turn to carry it")
        messages[image_turn]["content"].insert(0, {"type": "image"})
    return messages


def _clean(text: str) -> str:
    return text.replace(IMAGE, "").strip()


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn's content
    (surrounding whitespace trimmed). Raises ValueError when the template's render of a
    prefix is not a prefix of the whole (such a template cannot be masked this way)."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix; its "
                "assistant turns cannot be located for the loss mask"
            )
        start, end = len(before), len(through)
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return text, spans


def encode_conversation(
    tokenizer,
    turns: Sequence[Mapping[str, str]],
    *,
    has_image: bool,
    n_image_tokens: int,
    generation: bool = False,
) -> Encoded:
    """Tokenize one conversation, the image placeholder expanded to ``n_image_tokens``.

    ``generation`` True: the first human turn alone with the template's generation prompt
    (what greedy answering continues), no labels. Otherwise labels hold the ids of every
    assistant turn's tokens and its closing eos, IGNORE elsewhere (system, user turns,
    role markers, the image).
    """
    messages = to_messages(turns, has_image)
    if generation:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        text, spans = _render(tokenizer, messages[: first_user + 1], True), []
    else:
        text, spans = assistant_spans(tokenizer, messages)
    bos = tokenizer.bos_token
    enc = tokenizer(
        text,
        add_special_tokens=not (bos and text.startswith(bos)),
        return_offsets_mapping=True,
    )
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    j, closing = 0, False  # the span to look for next; an answer just ended without eos
    for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        inside = j < len(spans) and end > spans[j][0]
        if closing and not inside:
            closing = False
            if tid == eos:  # the template ends the answer with eos itself
                ids.append(tid)
                labels.append(tid)
                continue
            ids.append(eos)
            labels.append(eos)
        ids.append(tid)
        labels.append(tid if inside else IGNORE)
        closing = closing or inside
    if closing:
        ids.append(eos)
        labels.append(eos)
    return _expand_image(tokenizer, ids, labels, has_image, n_image_tokens)


def _expand_image(tokenizer, ids, labels, has_image: bool, n_image_tokens: int) -> Encoded:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    where = [i for i, t in enumerate(ids) if t == image_id]
    if not has_image:
        if where:
            raise ValueError("a text-only sample renders an image placeholder")
        return Encoded(ids, labels, -1)
    if len(where) != 1:
        raise ValueError(f"the template rendered {len(where)} image placeholders; expected 1")
    at = where[0]
    ids = ids[:at] + [image_id] * n_image_tokens + ids[at + 1 :]
    labels = labels[:at] + [IGNORE] * n_image_tokens + labels[at + 1 :]
    return Encoded(ids, labels, at)


def truncate(encoded: Encoded, max_length: int, n_image_tokens: int, name: str) -> Encoded:
    """Cut ``encoded`` to ``max_length`` tokens from the end, never inside the image's
    placeholders. Raises ValueError naming the sample when the image itself does not fit
    (raise max_length)."""
    if len(encoded.ids) <= max_length:
        return encoded
    if encoded.image_at >= 0 and encoded.image_at + n_image_tokens >= max_length:
        raise ValueError(
            f"sample {name}: its image's {n_image_tokens} tokens end at position "
            f"{encoded.image_at + n_image_tokens}, past max_length {max_length}; raise max_length"
        )
    return Encoded(encoded.ids[:max_length], encoded.labels[:max_length], encoded.image_at)
