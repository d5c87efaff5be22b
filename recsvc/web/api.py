"""Request types of the public API; validation happens in msgspec while decoding.

The same Structs will generate the OpenAPI schema, so the contract and the
validation cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from features.events import ID_REGEX, MAX_ID_LENGTH
from recsvc.errors import InvalidRequest

MAX_N = 100
# Every feature can be asked for (the schema has 60-odd), with room to grow.
MAX_EXPLAIN_TOP = 100
MAX_CANDIDATES = 1000
# GET /v1/recommendations: ids per list, so the request line fits aiohttp's 8190 bytes.
MAX_GET_IDS = 8

# Validated with the Python form of the rule; the contract shows the JSON Schema
# form (recsvc.web.openapi swaps it in).
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_REGEX)]
# number + multipleOf 1, not int: JSON Schema counts 5.0 as an integer (as the contract
# must), msgspec's int does not.
N = Annotated[float, msgspec.Meta(ge=1, le=MAX_N, multiple_of=1)]


Label = Annotated[str, msgspec.Meta(max_length=64)]
# A batch of 500 typical events is about 50 KB, inside the 64 KiB body limit.
MAX_EVENTS = 500


class Context(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the recommendation is shown; ``category`` steers the default strategy."""

    category: Id | None = None
    page: Label | None = None
    device: Label | None = None


class EventIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One behaviour event from the frontend; ``event_id`` makes retries safe."""

    event_id: Id
    user_id: Id
    item_id: Id
    type: Literal["view", "click", "add_to_cart", "purchase"]
    ts: Annotated[float, msgspec.Meta(gt=0)] | None = None
    request_id: Label | None = None
    context: Context | None = None


def _validation_error(exc: msgspec.ValidationError) -> InvalidRequest:
    message = str(exc)
    return InvalidRequest(message, field=_field_of(message))


def decode_events(body: bytes) -> tuple[bool, list[EventIn | InvalidRequest]]:
    """(is_batch, events) from one event or ``{"events": [...]}``.

    A bad event in a batch becomes its InvalidRequest (the batch goes on); a bad
    body, a bad single event or an oversized batch raises InvalidRequest.
    """
    doc = decode_json(body, Any)
    if isinstance(doc, dict) and "events" in doc and len(doc) == 1:
        items = doc["events"]
        if not isinstance(items, list):
            raise InvalidRequest("`events` must be an array", field="events")
        if not 1 <= len(items) <= MAX_EVENTS:
            raise InvalidRequest(f"`events` must hold 1 to {MAX_EVENTS} events", field="events")
        out: list[EventIn | InvalidRequest] = []
        for k, item in enumerate(items):
            try:
                out.append(msgspec.convert(item, EventIn))
            except msgspec.ValidationError as exc:
                err = _validation_error(exc)
                err.field = f"events[{k}]" + ("" if err.field == "body" else f".{err.field}")
                out.append(err)
        return True, out
    try:
        return False, [msgspec.convert(doc, EventIn)]
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None


class UserRef(msgspec.Struct, frozen=True):
    user_id: Id


class ItemRef(msgspec.Struct, frozen=True):
    item_id: Id


MAX_FEATURE_USERS = 100
MAX_FEATURE_ITEMS = 100


class FeaturesRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Online feature read: users' features, and user x item rows when items are given."""

    user_ids: Annotated[list[Id], msgspec.Meta(min_length=1, max_length=MAX_FEATURE_USERS)]
    item_ids: Annotated[list[Id], msgspec.Meta(max_length=MAX_FEATURE_ITEMS)] = []


class RecommendRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user_id: Id
    n: N | None = None
    candidates: (
        Annotated[list[Id], msgspec.Meta(min_length=1, max_length=MAX_CANDIDATES)] | None
    ) = None
    exclude: Annotated[list[Id], msgspec.Meta(max_length=MAX_CANDIDATES)] = []
    context: Context | None = None
    # Force variants (experiment -> variant) where the experiment allows it.
    flags: Annotated[dict[Label, Label], msgspec.Meta(max_length=20)] | None = None
    # Per-item feature contributions (model answers only), the largest `explain_top`.
    explain: bool = False
    explain_top: Annotated[float, msgspec.Meta(ge=1, le=MAX_EXPLAIN_TOP, multiple_of=1)] = 5


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


_FLAG = r"[A-Za-z0-9_.:@-]{1,64}=[A-Za-z0-9_.:@-]{1,64}"
# The whole X-Recsvc-Flags value, also its pattern in the OpenAPI document.
FLAGS_PATTERN = rf"^(?:{_FLAG}(?:, ?{_FLAG}){{0,19}})?$"
_FLAGS_RE = re.compile(FLAGS_PATTERN)


def parse_flags_header(value: str) -> dict[str, str]:
    """``X-Recsvc-Flags: exp=variant,exp2=variant``; InvalidRequest names the header."""
    if not _FLAGS_RE.fullmatch(value):
        raise InvalidRequest(
            "X-Recsvc-Flags must be experiment=variant pairs separated by commas",
            field="header:X-Recsvc-Flags",
        )
    flags: dict[str, str] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        name, sep, variant = part.partition("=")
        name, variant = name.strip(), variant.strip()
        if not sep or not name or not variant or len(name) > 64 or len(variant) > 64:
            raise InvalidRequest(
                "X-Recsvc-Flags must be experiment=variant pairs separated by commas",
                field="header:X-Recsvc-Flags",
            )
        flags[name] = variant
    if len(flags) > 20:
        raise InvalidRequest("at most 20 flags", field="header:X-Recsvc-Flags")
    return flags


class EventBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/events`` with several events (each validated on its own)."""

    events: Annotated[list[EventIn], msgspec.Meta(min_length=1, max_length=MAX_EVENTS)]


Price = Annotated[float, msgspec.Meta(ge=0, le=1e9)]


class CatalogueItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One catalogue item as ``PUT /admin/items`` sets it."""

    item_id: Id
    category: Id | None = None
    price: Price = 0.0


class CatalogueUpsert(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``PUT /admin/items``: items created or updated (category and price)."""

    items: Annotated[list[CatalogueItem], msgspec.Meta(min_length=1, max_length=MAX_EVENTS)]


class CatalogueDelete(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /admin/items/delete``: items deleted in one call (one reload)."""

    item_ids: Annotated[list[Id], msgspec.Meta(min_length=1, max_length=MAX_EVENTS)]


# Answer types: the contract of what the service sends (the handlers build the
# same shapes; tests/web/test_openapi.py checks live answers against them).


class Contribution(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One feature's share of a score; "(other)" sums the features not listed."""

    feature: str
    value: float | None
    contribution: float


class Explanation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """base_value + sum(contributions) = the item's score (raw model output)."""

    base_value: float
    contributions: list[Contribution]


class ItemOut(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    item_id: str
    score: float
    rank: int
    source: Literal[
        "request",
        "recent",
        "history",
        "collaborative",
        "related",
        "covisit",
        "category",
        "popular",
        "popular_month",
        "category_popular",
    ]
    category: str | None
    explanation: Explanation | msgspec.UnsetType = msgspec.UNSET


class ModelRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    version: str


class RecommendResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: str
    user_id: str
    items: list[ItemOut]
    strategy: Literal["model", "fallback", "popular"]
    fallback_reason: (
        Literal[
            "unknown_user",
            "feature_store_unavailable",
            "model_unavailable",
            "model_error",
            "no_candidates",
            "deadline",
            "overloaded",
        ]
        | None
    )
    model: ModelRef | None
    experiments: dict[str, str]
    forced: list[str] | msgspec.UnsetType = msgspec.UNSET


class RejectedEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An event that will never apply as sent: ``reason`` ``invalid`` (the field
    named is wrong) or ``unknown_item`` (the item is not in the catalogue and
    RECSVC_UNKNOWN_ITEMS refuses to create it)."""

    index: int
    reason: Literal["invalid", "unknown_item"]
    error: str
    field: str | None


class FailedEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A valid event the store could not apply now (its item's shard is full or
    broken); nothing of its item side was written: retry it."""

    index: int
    error: str


class EventsResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    accepted: int
    duplicates: int
    rejected: list[RejectedEvent]
    failed: list[FailedEvent]


class ItemFeatures(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    item_id: str
    features: dict[str, float | None]


class RecentItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    item_id: str
    ts: float
    category: str | None


class UserFeatures(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user_id: str
    known: bool
    state_age_secs: float | None
    features: dict[str, float | None]
    # The user's most recent items (newest first), as the candidate source sees them.
    recent: list[RecentItem]
    items: list[ItemFeatures] | msgspec.UnsetType = msgspec.UNSET


class FeaturesResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    users: list[UserFeatures]
    unknown_items: list[str]


class ExperimentsResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user_id: str
    experiments: dict[str, str]


class ErrorDetail(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    code: str
    message: str
    field: str | None


class ErrorResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    error: ErrorDetail


class Health(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status: Literal["ok"]


class Readiness(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    status: Literal["ready", "degraded", "not_ready"]
    checks: dict[str, bool]
    circuit: Literal["closed", "half_open", "open"]
    item_data_age_secs: float | None
    model: dict[str, str] | None
