"""README.md's Python examples and the docstring examples of the public names run as shown: a README that lies fails."""

from __future__ import annotations

import doctest
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest

import lookalike
from helpers import LOOKALIKE

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FENCE = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
WALKTHROUGH = "### Serve your own collection\n"  # a section run by its own test, shell steps included


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Every ```python block of a Markdown text as (line number of its first code line, code)."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder as the README's examples assume it: `lookalike data omniglot data/omniglot` run there, configs/ beside
    it."""
    root = tmp_path_factory.mktemp("readme")
    done = subprocess.run(
        [LOOKALIKE, "data", "omniglot", "data/omniglot"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    shutil.copytree(REPO / "configs", root / "configs")
    return root


def test_readme_python_blocks_run_in_order(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    blocks = python_blocks(without_walkthrough(README.read_text(encoding="utf-8")))
    assert len(blocks) >= 4, "the README's 'From Python' examples are gone"
    for line, code in blocks:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})  # the README's own code
    printed = capsys.readouterr().out
    assert "distance" in printed and "cmc@1" in printed  # the index query's table and the metrics were printed
    assert (
        workdir / "runs" / "latin" / "manifest.json"
    ).is_file()  # the index folder `lookalike serve runs/latin` serves


def without_walkthrough(text: str) -> str:
    """The README less the "Serve your own collection" section, whose steps (shell and Python) its own test runs."""
    start = text.index(WALKTHROUGH)
    end = text.find("\n##", start + len(WALKTHROUGH))  # the next heading
    return text[:start] + text[end:]


def walkthrough_blocks(text: str) -> list[tuple[str, int, str]]:
    """The "Serve your own collection" section's ```bash and ```python blocks as (language, line, code), in order."""
    start = text.index(WALKTHROUGH)
    end = text.find("\n##", start + len(WALKTHROUGH))  # the next heading
    return [(m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text, start, end)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_your_own_collection_runs_as_written(workdir, monkeypatch, capsys):
    """Flat folder of unlabelled images -> table with metadata -> Milvus Lite index -> filtered search from the CLI, the
    server's API and Python: each README step as written (shell in bash, the server on a free port)."""
    monkeypatch.chdir(workdir)
    env = {**os.environ, "PATH": f"{Path(LOOKALIKE).parent}{os.pathsep}{os.environ['PATH']}"}
    port = str(free_port())
    shell = []
    for language, line, code in walkthrough_blocks(README.read_text(encoding="utf-8")):
        if language == "bash":
            done = subprocess.run(
                ["bash", "-e", "-c", code.replace("8000", port)],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, f"README.md:{line}: {done.stderr}"
            shell.append(done.stdout)
        else:
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
    table = pd.read_csv(workdir / "collection.csv")
    assert "alphabet" in table.columns and "label" not in table.columns  # a flat folder: a gallery without labels
    manifest = json.loads((workdir / "runs" / "collection" / "manifest.json").read_text())
    assert (manifest["backend"], manifest["collection"]) == ("milvus", "omniglot")
    assert not (workdir / "runs" / "collection" / "embeddings.npz").exists()
    drawings = workdir / "data" / "omniglot" / "images_background_small1"
    latin = {path.name for path in (drawings / "Latin").glob("*/*.png")}
    listed = set(re.findall(r"\d{4}_\d{2}\.png", shell[1])) - {"0394_01.png"}  # the ids `lookalike query` printed
    assert len(listed) == 5 and listed <= latin, shell[1]
    items = json.loads(shell[2].splitlines()[-1])["columns"][0]["items"]
    assert len(items) == 5 and all(item["metadata"]["alphabet"] == "Latin" for item in items), shell[2]
    assert all(item["external_id"] in latin and item["label"] is None for item in items), shell[2]
    printed = capsys.readouterr().out.split("\n", 1)[1]  # the hits of the Python query
    assert printed.count("Latin") == 5 and "Greek" not in printed


def test_the_index_task_is_five_lines_from_one_import():
    """Embed a folder, index it and query one new image: the first example of 'From Python', <= 5 lines, one import."""
    section = README.read_text(encoding="utf-8").split("\n## From Python\n", 1)[1]
    _, code = python_blocks(section)[0]
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 5, code
    assert [line for line in lines if line.startswith(("import ", "from "))] == ["import lookalike"]
    assert "GalleryIndex.build(" in code and ".query(" in code


def test_python_blocks_are_found_with_their_lines():
    text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\nz = 3\n")]


# the public functions and methods, in an order where each example finds what an earlier one wrote (runs/latin)
DOCUMENTED = [
    lookalike.load_table,
    lookalike.import_folder,
    lookalike.load_config,
    lookalike.Extractor,
    "Extractor.from_config",
    lookalike.embed,
    "search.search",
    lookalike.search_table,
    lookalike.compute_metrics,
    lookalike.evaluate_table,
    lookalike.list_rerankers,
    lookalike.create_reranker,
    "GalleryIndex.build",
    "GalleryIndex.query",
]


def documented() -> list[tuple[str, object]]:
    """(qualified name, object) of every entry of DOCUMENTED."""
    out = []
    for entry in DOCUMENTED:
        if isinstance(entry, str):
            owner, attr = entry.split(".")
            out.append((entry, getattr(getattr(lookalike, owner), attr)))
        else:
            out.append((entry.__qualname__, entry))
    return out


def test_every_public_function_is_documented():
    """Every function in lookalike.__all__ is listed above, and each docstring has Args (if it takes any), Returns,
    Example."""
    listed = {id(obj) for _, obj in documented()}
    functions = [
        n
        for n in lookalike.__all__
        if inspect.isfunction(getattr(lookalike, n)) and id(getattr(lookalike, n)) not in listed
    ]
    assert functions == [], f"public functions missing from DOCUMENTED: {functions}"
    for name, obj in documented():
        doc = inspect.getdoc(obj) or ""
        takes = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        needed = (["Args:"] if takes else []) + (["Returns:"] if not inspect.isclass(obj) else []) + ["Example:"]
        missing = [section for section in needed if section not in doc]
        assert not missing, f"{name}: docstring lacks {missing}"


def test_docstring_examples_run(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for name, obj in documented():
        tests = finder.find(obj, name, globs={})
        assert tests and tests[0].examples, f"{name}: no example"
        for test in tests:
            runner.run(test, out=report.append)
    assert runner.summarize(verbose=False).failed == 0, "".join(report)
