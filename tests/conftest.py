"""Shared fixtures: the real data in ../shared/data (never copied into the project)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

#: Tests marked ``slow`` (deselect with ``-m "not slow"``): every test that runs a real agent (it
#: asks for one of these fixtures), the modules of agent processes, kill rounds, fuzzing and
#: archives, and single long tests. The full suite (CI) runs them all.
SLOW_FIXTURES = {"refs", "running", "real_run", "real", "real_store"}
SLOW_MODULES = {"test_daemon", "test_durability", "test_delivery", "test_service", "test_hardening_files",
                "test_sxm_fuzz", "test_batch", "test_triggers", "test_library_reload", "test_bluesky"}
SLOW_TESTS = {"test_vit_b32_random_weights"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))) or module in SLOW_MODULES \
                or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


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
