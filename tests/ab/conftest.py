"""Fixtures of the A/B and roll-out tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from recsvc.ranking import models


@pytest.fixture
def two_versions(model_dir: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A registry with two versions of `ranker`: the trained one and a copy
    under a newer name (a different version of the same quality)."""
    root = tmp_path / "models"
    shutil.copytree(model_dir, root)
    (old,) = [p.name for p in models.versions(root, "ranker")]
    new = "29991231T000000000"
    shutil.copytree(root / "ranker" / old, root / "ranker" / new)
    return root, old, new
