"""Shared fixtures: the real data in ../shared/data (never copied into the project)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"real test data missing: {path} (expected ../shared/data next to the repository; "
            "see ../shared/data/SOURCES.md)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (fails the test with a clear message when it is missing)."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def sxm_dir(shared_data: Path) -> Path:
    """Folder of the real Nanonis scans."""
    return _require(shared_data / "sxm")


@pytest.fixture(scope="session")
def labelled_dir(shared_data: Path) -> Path:
    """Folder of the labelled STM images (COCO JSON)."""
    return _require(shared_data / "labelled")


@pytest.fixture(scope="module")
def refs(sxm_dir, tmp_path_factory) -> Path:
    """One-species reference library (``adsorbate``: the first whole adsorbate of the Au(111) scan),
    in a temporary folder."""
    from tests.helpers import build_refs

    return build_refs(sxm_dir, tmp_path_factory.mktemp("refs"))
