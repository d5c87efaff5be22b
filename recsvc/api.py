"""Request types of the public API; validation happens in msgspec while decoding.

The same Structs will generate the OpenAPI schema, so the contract and the
validation cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec

from recsvc.errors import InvalidRequest

ID_PATTERN = r"^[A-Za-z0-9_.:@\-]+$"
MAX_ID_LENGTH = 128
MAX_N = 100
MAX_CANDIDATES = 1000

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]
N = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]


class Context(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the recommendation is shown; ``category`` steers the default strategy."""

    category: Id | None = None
    page: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class RecommendRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user_id: Id
    n: N | None = None
    candidates: (
        Annotated[list[Id], msgspec.Meta(min_length=1, max_length=MAX_CANDIDATES)] | None
    ) = None
    exclude: Annotated[list[Id], msgspec.Meta(max_length=MAX_CANDIDATES)] = []
    context: Context | None = None


T = TypeVar("T")
_AT = re.compile(r"at `\$\.?([^`]*)`")
_FIELD = re.compile(r"field `([^`]+)`")


def _field_of(message: str) -> str:
    """The JSON path of the failing field ('body' when it is the whole document)."""
    at, named = _AT.search(message), _FIELD.search(message)
    parts = [m.group(1) for m in (at, named) if m and m.group(1)]
    return ".".join(parts) or "body"


def decode_json(body: bytes, kind: type[T]) -> T:
    """Decode and validate a JSON body; InvalidRequest names the failing field."""
    if not body:
        raise InvalidRequest("request body is empty", field="body", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        raise InvalidRequest(message, field=_field_of(message)) from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise InvalidRequest(
            "request body is not valid UTF-8 JSON", field="body", code="invalid_json"
        ) from None


def convert_query(params: dict[str, Any], kind: type[T]) -> T:
    """Validate query-string parameters into a request type (strings coerced)."""
    try:
        return msgspec.convert(params, type=kind, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        raise InvalidRequest(message, field=_field_of(message)) from None
