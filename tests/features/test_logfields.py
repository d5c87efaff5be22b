"""The vectorised checks of event-log fields agree with the line reader's rules."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pyarrow as pa

from features import logfields
from features.logs import valid_id


def test_times_parse_as_float_parses_them() -> None:
    """pyarrow's parse of the plain decimals it is given rounds as float() does,
    near-halfway cases and long mantissas included."""
    rng = np.random.default_rng(5)
    texts = []
    for _ in range(20000):
        whole = "".join(rng.choice(list("0123456789"), int(rng.integers(1, 20))))
        frac = "".join(rng.choice(list("0123456789"), int(rng.integers(0, 12))))
        texts.append(f"{whole}.{frac}" if frac else whole)
    for x in (rng.random(3000) * 2e9).tolist():
        # Just below, at (to 31 characters) and just above the midpoint of two doubles.
        mid = (Decimal(x) + Decimal(float(np.nextafter(x, np.inf)))) / 2
        texts += [f"{mid:.30f}"[:31], f"{mid:.30f}"[:24], repr(x)]
    texts += ["9007199254740993", "9007199254740993.0000000001", "0.1", "000123.4500"]
    ok, values = logfields.times(pa.array([t.encode() for t in texts], pa.binary()), 1000.0)
    want = np.array([float(t) / 1000.0 for t in texts])
    assert ok.sum() > 0.95 * len(texts)
    assert np.array_equal(values[ok], want[ok])
    assert ((want > 0) | ~ok).all()


def test_ids_ok_is_valid_id() -> None:
    ids = ["u1", "a-b.c:d@e_F9", "x" * 128, "x" * 129, "", "a b", "ü", "u\n", "ǅ", "\x00"]
    raw = [i.encode() for i in ids] + [b"\xff", b"u\xc3", b"\xed\xa0\x80"]
    ok = logfields.ids_ok(pa.array(raw, pa.binary()))
    assert ok.tolist() == [valid_id(r.decode("utf-8", "replace")) for r in raw]
    assert ok[:4].tolist() == [True, True, True, False]
