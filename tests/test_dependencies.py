"""Dependency floors exclude releases with published vulnerabilities, the installed versions meet every floor, and
every checkpoint load stays weights-only (README, "Untrusted input")."""

from __future__ import annotations

import ast
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# the last release with a published advisory that reaches this project, and the first release that fixes it
VULNERABLE = {
    "torch": (
        "2.9.1",
        "2.10.0",
    ),  # CVE-2026-24747: weights_only unpickler memory corruption (CVE-2025-32434 before 2.6)
    "torchvision": ("0.24.1", "0.25.0"),  # built for the vulnerable torch releases
    "pillow": (
        "12.2.0",
        "12.3.0",
    ),  # CVE-2026-54059, -54060, -55379, -55380, -55798 (and CVE-2024-28219, CVE-2026-25990 earlier)
    "starlette": (
        "1.3.0",
        "1.3.1",
    ),  # CVE-2026-54283 form limits ignored (and CVE-2024-47874, CVE-2025-62727, CVE-2026-48710 earlier)
    "fastapi": ("0.110.0", "0.133.0"),  # the old floor only allows Starlette < 1.0
    "python-multipart": (
        "0.0.30",
        "0.0.31",
    ),  # CVE-2026-53540 (and CVE-2024-53981, CVE-2026-40347, CVE-2026-53538 earlier)
    "h11": ("0.15.0", "0.16.0"),  # CVE-2025-43859 request smuggling, under uvicorn
}


def requirements() -> dict[str, Requirement]:
    """The project's runtime dependencies from pyproject.toml, by normalised name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(text).name.lower(): Requirement(text) for text in project["dependencies"]}


@pytest.mark.parametrize("name", sorted(VULNERABLE))
def test_floors_exclude_vulnerable_releases(name):
    requirement = requirements().get(name)
    assert requirement is not None, f"{name} is not a declared dependency"
    vulnerable, fixed = VULNERABLE[name]
    assert not requirement.specifier.contains(vulnerable), f"{requirement} allows {name} {vulnerable}"
    assert requirement.specifier.contains(fixed)


def test_the_installed_versions_meet_every_floor():
    """CI installs from the local wheel cache: the floors must be satisfiable by what is installed."""
    unmet = {
        name: version(name)
        for name, req in requirements().items()
        if not req.specifier.contains(Version(version(name)))
    }
    assert unmet == {}


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_checkpoint_load_is_weights_only():
    """torch.load and a Lightning fit that resumes a checkpoint pass weights_only=True explicitly (so neither torch's
    default nor TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD can turn it off)."""
    unsafe, loads = [], 0
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            is_load = (
                node.func.attr == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            )
            is_resume = node.func.attr == "fit" and keyword(node, "ckpt_path") is not None
            if is_load or is_resume:
                loads += 1
                flag = keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert (
        loads >= 3 and unsafe == []
    )  # the walk finds the loads (two torch.load, the resuming fit both trainers share)


def test_no_module_imports_a_private_name_of_another():
    """`from lookalike.x import _name` reaches into another module's internals: what two modules share is public
    (e.g. lookalike.train.trainer, which the extractor and the pairwise trainers both build on)."""
    private = []
    for path in sorted((ROOT / "src" / "lookalike").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lookalike"):
                private += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.endswith("__")
                ]
    assert private == []


def test_the_readme_says_how_untrusted_checkpoints_are_treated():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Untrusted input", 1)[1].split("\n## ", 1)[0]
    assert "weights_only=True" in section and "CVE-2026-24747" in section and "torch 2.10" in section
