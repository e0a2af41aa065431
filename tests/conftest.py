"""Shared fixtures: a small real dataset (the Omniglot subset bundled with the package) unpacked once per session."""

from __future__ import annotations

import os

# One OpenMP thread per process (this one, and every `lookalike` / DDP / server process a test starts, which inherit
# the variable), unless the caller set OMP_NUM_THREADS: the tests' tensors are tiny, and two threads that spin-wait
# at each barrier crawl once the cores are shared (a resnet18 extract of 80 images: 20 s with two threads on the
# loaded 2-core machine, 1.3 s with one; see tests/test_faiss_shards.py for faiss's k-means).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import zipfile
from pathlib import Path

import pytest

from lookalike.data.bundled import OMNIGLOT_ZIP
from lookalike.data.folder import import_folder
from lookalike.pipeline import extractor_from_config, table_from_config
from lookalike.serve import build_index


@pytest.fixture(scope="session")
def omniglot_small(tmp_path_factory) -> Path:
    """Eight characters of one alphabet (8 x 20 drawings), as alphabet/characterNN/*.png."""
    root = tmp_path_factory.mktemp("omniglot")
    with zipfile.ZipFile(OMNIGLOT_ZIP) as zf:
        names = [
            n
            for n in zf.namelist()
            if n.endswith(".png") and "/Balinese/character0" in n and int(n.split("character")[1][:2]) <= 8
        ]
        for name in names:
            target = root / Path(name).relative_to("images_background_small1")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    return root


@pytest.fixture(scope="module")
def table_csv(omniglot_small, tmp_path_factory) -> Path:
    """The eight characters as a dataset table, half of them validating (80 queries, each against the other 79
    images), in a folder of the test module's own."""
    path = tmp_path_factory.mktemp("table") / "table.csv"
    import_folder(omniglot_small, validation_fraction=0.5, seed=0).save(path)
    return path


@pytest.fixture(scope="module")
def index_dir(table_csv) -> Path:
    """The served test index (helpers.index_config) of table_csv's validation split; uploads up to 0.2 MB."""
    from helpers import index_config  # here, not at the top: test_setup runs this conftest in a folder of its own

    cfg = index_config(table_csv, table_csv.parent / "index", "serve.max_upload_mb=0.2")
    return build_index(cfg, table_from_config(cfg), extractor_from_config(cfg))


# ---- a skipped test is a failure, unless its reason names an optional component ----
# A clone must run every test: data the tests need ships in the repository (tests/data, the bundled Omniglot zip).
# The only tests allowed to skip are those of components a machine may lack by design; their skip reason must start
# with "optional: <component>", <component> from this list.
OPTIONAL_COMPONENTS = {
    "cuda": "a CUDA GPU (the suite runs on CPU; GPU-only checks skip without one)",
}


def allowed_skip(reason: str) -> bool:
    """True when `reason` reads 'optional: <component> ...' with <component> in OPTIONAL_COMPONENTS."""
    prefix, _, rest = reason.partition("optional: ")
    return not prefix.strip() and rest.split(" ", 1)[0].rstrip(":,;") in OPTIONAL_COMPONENTS


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason of a skip report ('Skipped: ' prefix removed)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_unlisted_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skip whose reason names no optional component into a failure that says why."""
    if report.skipped and not hasattr(report, "wasxfail") and not allowed_skip(skip_reason(report)):
        listed = ", ".join(OPTIONAL_COMPONENTS)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped without naming an optional component ({skip_reason(report)!r}); every test must run "
            f"in a clone, or skip with a reason 'optional: <component>' where <component> is one of: {listed}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Skips in setup (skipif, fixtures) or in the test body are failures unless allowed."""
    outcome = yield
    _fail_unlisted_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level pytest.skip (or importorskip) is a failure unless allowed."""
    outcome = yield
    _fail_unlisted_skip(outcome.get_result())
