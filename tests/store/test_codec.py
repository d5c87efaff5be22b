"""The codec is the one definition of the storage layouts: its fields cover the
rows exactly, the scripts take their layout from it, and docs/storage.md
names every field and file it tells a maintainer to change."""

from __future__ import annotations

import re
from pathlib import Path

from features.events import N_COUNTERS
from features.state import ITEM_WIDTH, UserState
from recsvc.store import codec

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "storage.md"


def _columns(fields: tuple[codec.Field, ...]) -> list[int]:
    return sorted(c for f in fields for c in range(f.start, f.start + f.width))


def test_item_fields_cover_the_row_exactly_once() -> None:
    assert _columns(codec.ITEM_FIELDS) == list(range(ITEM_WIDTH))
    assert codec.ITEM_ROW_BYTES == 8 * ITEM_WIDTH


def test_user_fields_cover_the_packed_vector_and_name_user_state_attributes() -> None:
    width = len(codec.USER_SCALARS) + N_COUNTERS
    assert _columns(codec.USER_FIELDS) == list(range(width))
    for name in codec.USER_SCALARS:
        assert hasattr(UserState(), name), name


def test_scripts_hold_no_layout_of_their_own() -> None:
    """The old hard-coded offsets (e.g. 'nref = 5 + 4 * nh', a loop over four
    event types, six scalars) are gone: the layout comes in ARGV."""
    lua = ROOT / "recsvc" / "store" / "lua"
    for script in lua.glob("*.lua"):
        text = script.read_text()
        assert not re.search(r"\b4 \* nh\b|for j = 0, 3 do|\b6 \+ nc\b|\b7 \+ k\b", text), script
    head = codec.item_layout()
    nh = int(head[12])
    assert len(head) == 13 + nh == codec.ITEM_LAYOUT_ARGS


def test_the_storage_page_names_every_field_and_existing_files() -> None:
    text = DOC.read_text()
    for field in (*codec.ITEM_FIELDS, *codec.USER_FIELDS):
        assert f"`{field.name}`" in text, field.name
    assert f"`N_SHARDS` = {len(codec.SHARD_TAGS)}" in text
    paths = set(re.findall(r"`((?:features|recsvc|tests)/[\w/.]+\.(?:py|lua))`", text))
    assert len(paths) >= 7
    for path in paths:
        assert (ROOT / path).is_file(), path
