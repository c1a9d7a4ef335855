"""The pool's data contract: schemas, and the normalisation of one LLaVA-format record.

``normalize_record`` turns one raw record (a dict from LLaVA JSON, JSONL or
Parquet) into a pool row, or into a reject with a machine code and a sentence
saying what was wrong. It never raises for bad data.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from engine.errors import InputError

IMAGE_TOKEN = "<image>"
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}

TURN_TYPE = pa.struct([("from", pa.string()), ("value", pa.string())])
# Rows per Parquet row group of a pool shard: a stage that reads a few rows (PROGRESS's
# reveal, a selection's records) reads only their groups, so image bytes of the rest
# stay unread; 1024 rows of LLaVA's ~100 KB images make groups of ~100 MB.
POOL_ROW_GROUP_ROWS = 1024

POOL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),  # inline encoded bytes; null for text-only or by-reference
        pa.field("image_ref", pa.string()),  # the record's own path or URI, as given
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("conversations", pa.list_(TURN_TYPE), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("record_index", pa.int64(), nullable=False),
    ]
)
REJECT_SCHEMA = pa.schema(
    [
        pa.field("record_index", pa.int64(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason_code", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string()),
    ]
)

ImageCheck = Literal["decode", "header", "none"]


class Rejected(Exception):
    """Internal signal: the record is refused with ``code`` and a human ``reason``."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class ImagePolicy:
    """How image references are resolved and checked.

    ``root`` is a local directory or a pyarrow-filesystem URI; every reference must
    resolve inside it (symlinks included), so a record cannot read other files.
    """

    root: str | None
    check: ImageCheck = "decode"
    inline: bool = True
    _fs: pafs.FileSystem | None = field(default=None, repr=False)
    _root_path: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.root is None:
            return
        if "://" in self.root and not self.root.startswith("file://"):
            try:
                self._fs, path = pafs.FileSystem.from_uri(self.root)
            except (pa.ArrowInvalid, OSError) as err:
                raise InputError(
                    f"image root {self.root!r} is not a usable directory or URI ({err}); pass "
                    "--images with a local directory or a pyarrow-filesystem URI (s3://, gs://, ...)"
                ) from None
            self._root_path = path.rstrip("/")
        else:
            local = self.root.removeprefix("file://")
            self._fs, self._root_path = pafs.LocalFileSystem(), os.path.realpath(local)

    def read(self, ref: str) -> bytes:
        """Bytes of the image that ``ref`` names; raises Rejected for escapes and missing files."""
        if self._root_path is None:
            raise Rejected(
                "image_escapes_root",
                f"image {ref!r} is a path but no image root was given (pass --images DIR)",
            )
        if "\x00" in ref:  # os and pyarrow raise ValueError for it: no file has such a name
            raise Rejected("image_not_found", f"image path {ref!r} holds a NUL byte")
        path = self._resolve(ref)
        try:
            with self._fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise Rejected("image_not_found", f"image file not found: {ref!r}") from None
        except (IsADirectoryError, OSError) as err:
            try:
                missing = self._fs.get_file_info(path).type == pafs.FileType.NotFound
            except OSError:  # a name too long to stat, say
                missing = False
            if missing:
                raise Rejected("image_not_found", f"image file not found: {ref!r}") from None
            raise Rejected("image_unreadable", f"image {ref!r} cannot be read: {err}") from None

    def _resolve(self, ref: str) -> str:
        root = self._root_path
        if isinstance(self._fs, pafs.LocalFileSystem):
            local = ref.removeprefix("file://")
            if "://" in local:
                raise Rejected(
                    "image_escapes_root", f"image {ref!r} is a URI outside the image root {root}"
                )
            path = os.path.realpath(os.path.join(root, local))
            if path != root and not path.startswith(root + os.sep):
                raise Rejected(
                    "image_escapes_root",
                    f"image path {ref!r} resolves outside the image root {root}",
                )
            return path
        # Remote root: a full URI must sit under the root; a relative path may not climb out.
        relative = ref
        if "://" in ref:
            try:
                _, ref_path = pafs.FileSystem.from_uri(ref)
            except (pa.ArrowInvalid, OSError):
                ref_path = ""  # an unknown scheme cannot be under the root
            if not ref_path.startswith(root + "/"):
                raise Rejected(
                    "image_escapes_root", f"image URI {ref!r} is outside the image root {self.root}"
                )
            relative = ref_path[len(root) + 1 :]
        normalized = os.path.normpath(relative)
        if normalized.startswith("..") or os.path.isabs(normalized):
            raise Rejected(
                "image_escapes_root",
                f"image path {ref!r} resolves outside the image root {self.root}",
            )
        return f"{root}/{normalized}"


def record_id(record: Any) -> str | None:
    """The record's id as the pool stores it, or None when it has no usable id."""
    if not isinstance(record, dict):
        return None
    value = record.get("id")
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def normalize_record(
    record: Any, record_index: int, source: str, policy: ImagePolicy
) -> tuple[dict | None, dict | None]:
    """Return ``(pool_row, None)`` or ``(None, reject_row)`` for one raw record."""
    try:
        return _normalize(record, record_index, source, policy), None
    except Rejected as rej:
        return None, make_reject(record, record_index, source, rej.code, rej.reason)


def make_reject(record: Any, record_index: int, source: str, code: str, reason: str) -> dict:
    sample_id = record_id(record)
    return {
        "record_index": record_index,
        "id": None if sample_id is None else _storable(sample_id),
        "source": source,
        "reason_code": code,
        "reason": _storable(reason),
        "raw": raw_snippet(record),
    }


def raw_snippet(record: Any, limit: int = 1000) -> str:
    """A short JSON rendering of a raw record for the rejects file; bytes shown by size only."""

    def _default(obj: Any) -> str:
        if isinstance(obj, (bytes, bytearray)):
            return f"<{len(obj)} bytes>"
        return repr(obj)

    try:
        text = json.dumps(record, default=_default, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = reprlib.repr(record)
    text = _storable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _storable(text: str) -> str:
    """``text`` with lone surrogates escaped: Arrow stores only valid UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unicode(text: str, what: str) -> str:
    """``text``, or a reject when it holds a lone surrogate (a stray ``\\ud800`` JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(
            "invalid_unicode",
            f"{what} holds a lone UTF-16 surrogate, which is not text ({reprlib.repr(text)}); "
            "fix the \\uD800-\\uDFFF escapes in the source",
        ) from None
    return text


def _normalize(record: Any, record_index: int, source: str, policy: ImagePolicy) -> dict:
    if not isinstance(record, dict):
        raise Rejected("not_an_object", f"record is a {type(record).__name__}, not an object")
    sample_id = _check_id(record)
    turns = _check_conversations(record.get("conversations", _MISSING))
    image_value = record.get("image")
    n_tokens = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if n_tokens > 1:
        raise Rejected(
            "multi_image", f"conversation has {n_tokens} {IMAGE_TOKEN} tokens; one is supported"
        )
    image_bytes, image_ref = None, None
    width = height = None
    if image_value is None:
        if n_tokens:
            raise Rejected(
                "image_token_without_image",
                f"conversation has an {IMAGE_TOKEN} token but the record names no image",
            )
    else:
        data, image_ref = _image_bytes(image_value, policy)
        width, height = _check_image(data, policy.check, image_ref or "inline image")
        if policy.inline or image_ref is None:
            image_bytes = data
        if not n_tokens:
            # LLaVA's preprocessing expects the token in the first human turn.
            turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
    question, answer = first_exchange(turns)
    if not question:
        raise Rejected("bad_conversations", "the first human turn is empty")
    return {
        "id": sample_id,
        "image": image_bytes,
        "image_ref": image_ref,
        "width": width,
        "height": height,
        "question": question,
        "answer": answer,
        "conversations": turns,
        "source": source,
        "record_index": record_index,
    }


def first_exchange(turns: list[dict]) -> tuple[str, str]:
    """The first human turn without its image token, and the reply to it."""
    return turns[0]["value"].replace(IMAGE_TOKEN, "").strip(), turns[1]["value"]


_MISSING = object()


def _check_id(record: dict) -> str:
    if "id" not in record or record["id"] is None:
        raise Rejected("missing_id", "record has no 'id'")
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Rejected("bad_id_type", f"'id' is a {type(value).__name__}; expected a string")
    if isinstance(value, str) and not value.strip():
        raise Rejected("missing_id", "'id' is an empty string")
    return _unicode(value, "'id'") if isinstance(value, str) else str(value)


def _check_conversations(value: Any) -> list[dict]:
    if value is _MISSING or value is None:
        raise Rejected("missing_conversations", "record has no 'conversations'")
    if isinstance(value, str):  # some Parquet exports store the turns as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Rejected(
                "bad_conversations", "'conversations' is a string that is not a JSON list of turns"
            ) from None
    if not isinstance(value, list):
        raise Rejected(
            "bad_conversations",
            f"'conversations' is a {type(value).__name__}; expected a list of {{from, value}} turns",
        )
    if not value:
        raise Rejected("empty_conversations", "'conversations' is empty")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise Rejected(
                "bad_conversations", f"turn {i} is not an object with 'from' and 'value'"
            )
        role, text = turn["from"], turn["value"]
        if not isinstance(text, str):
            raise Rejected(
                "bad_conversations", f"turn {i} 'value' is a {type(text).__name__}, not a string"
            )
        if role not in ROLE_ALIASES:
            raise Rejected(
                "bad_conversations",
                f"turn {i} has role {role!r}; expected one of {sorted(ROLE_ALIASES)}",
            )
        expected = "human" if i % 2 == 0 else "gpt"
        if ROLE_ALIASES[role] != expected:
            raise Rejected(
                "bad_conversations", f"turn {i} is from {role!r}; turns must alternate human, gpt"
            )
        turns.append({"from": expected, "value": _unicode(text, f"turn {i} 'value'")})
    if len(turns) % 2:
        raise Rejected("bad_conversations", "the last human turn has no answer turn after it")
    if not turns[1]["value"].strip():
        raise Rejected("bad_conversations", "the first answer turn is empty")
    return turns


def _image_bytes(value: Any, policy: ImagePolicy) -> tuple[bytes, str | None]:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
        if value.get("bytes"):
            data = value["bytes"]
            # bytes(n) of an int would allocate n zero bytes: a huge count is a memory bomb.
            if not isinstance(data, (bytes, bytearray)):
                raise Rejected(
                    "bad_image_type",
                    f"'image' object's 'bytes' is a {type(data).__name__}; expected encoded "
                    "image bytes (a path or a data: URI carries an image in JSON)",
                )
            return bytes(data), None
        value = value.get("path")
        if not isinstance(value, str) or not value:
            raise Rejected("bad_image_type", "'image' object has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise Rejected("image_unreadable", "'image' holds zero bytes")
        return bytes(value), None
    if isinstance(value, list):
        raise Rejected("multi_image", f"'image' lists {len(value)} images; one is supported")
    if not isinstance(value, str):
        raise Rejected(
            "bad_image_type", f"'image' is a {type(value).__name__}; expected a path, URI or bytes"
        )
    if not value.strip():
        raise Rejected("bad_image_type", "'image' is an empty string")
    _unicode(value, "'image'")
    if value.startswith("data:"):
        _, _, payload = value.partition(",")
        try:
            return base64.b64decode(payload, validate=True), None
        except (binascii.Error, ValueError):
            raise Rejected(
                "image_unreadable", "'image' is a data: URI with invalid base64"
            ) from None
    return policy.read(value), value


def _check_image(data: bytes, check: ImageCheck, label: str) -> tuple[int | None, int | None]:
    if check == "none":
        return None, None
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            if check == "decode":
                img.load()
            else:
                img.verify()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as err:
        raise Rejected("image_unreadable", f"{label} cannot be decoded: {err}") from None
    return size


def llava_record(row: dict[str, Any], write_image: Callable[[str, bytes], None]) -> dict:
    """A pool row (id, image, image_ref, conversations) as a LLaVA record.

    An image the pool refers to keeps its reference; inline image bytes go to
    ``write_image("images/<id>.png", bytes)``, a path relative to the JSON's folder.
    """
    record = {"id": row["id"], "conversations": row["conversations"]}
    if row["image_ref"]:
        record["image"] = row["image_ref"]
    elif row["image"] is not None:
        record["image"] = f"images/{row['id']}.png"
        write_image(record["image"], row["image"])
    return record


def ids_text(ids: pa.Array) -> bytes:
    """``ids`` (string (n,)) as ids.txt: one per line, joined by Arrow (no Python strings)."""
    if not len(ids):
        return b""
    one = pa.ListArray.from_arrays(pa.array([0, len(ids)], pa.int32()), ids)
    return pc.binary_join(one, "\n")[0].as_py().encode() + b"\n"
