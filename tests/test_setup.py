"""A newcomer's first hour: a whole repository (no ../shared), skips that fail, `lookalike data omniglot`,
`lookalike config show`, the config reference page and the --help that points at it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helpers import LOOKALIKE
from lookalike import cli
from lookalike.config import Config, load_config, valid_keys
from lookalike.config_doc import config_page, config_yaml, field_comments
from lookalike.core.table import load_table
from lookalike.data.bundled import OMNIGLOT_ROOT, prepare_omniglot, unpack_omniglot
from lookalike.data.folder import import_folder
from lookalike.data.pairs import load_pairs

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `lookalike` command."""
    return subprocess.run([LOOKALIKE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def tracked_files() -> list[str]:
    """Files git tracks in this checkout (a clone has exactly these)."""
    done = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    return [f for f in done.stdout.split("\0") if f]


# ---- item 1: the repository is whole ----


def test_no_tracked_file_needs_the_workplace_shared_folder():
    text_files = [
        f
        for f in tracked_files()
        if f.endswith((".py", ".md", ".yaml", ".toml", ".txt", ".cfg", ".ini")) or f in ("Makefile", ".ci/run")
    ]
    own = {"tests/test_setup.py"}  # this test names the pattern it looks for
    offenders = [
        f
        for f in text_files
        if f not in own and re.search(r"\.\./shared|shared/data|shared/DESIGN", (REPO / f).read_text(errors="replace"))
    ]
    assert offenders == []


def test_every_file_the_tests_read_is_tracked_not_ignored():
    tracked = set(tracked_files())
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "tests" / "data").rglob("*") if p.is_file()}
    assert on_disk and on_disk <= tracked  # a .gitignore'd data/ once left tests/data out of every clone
    for needed in (
        "src/lookalike/data/bundled/omniglot_background_small1.zip",
        "src/lookalike/data/bundled/OMNIGLOT_LICENSE",
        "docs/design.md",
        "docs/config.md",
        "LICENSE",
        "CHANGELOG.md",
        "CONTRIBUTING.md",
    ):
        assert needed in tracked, needed


def test_readme_links_the_projects_own_design_notes():
    readme = (REPO / "README.md").read_text()
    assert "docs/design.md" in readme and "docs/config.md" in readme
    assert (REPO / "docs" / "design.md").read_text().startswith("# ")


# ---- item 1: a skip is a failure unless it names an optional component ----

INNER_TESTS = """
import pytest

@pytest.fixture
def missing_data():
    pytest.skip("data/foo not found")

def test_plain_skip():
    pytest.skip("no data here")

@pytest.mark.skipif(True, reason="../shared not found")
def test_skipif():
    pass

def test_fixture_skip(missing_data):
    pass

@pytest.mark.skip(reason="optional: cuda, no GPU on this machine")
def test_optional_component():
    pass

@pytest.mark.skip(reason="optional: crystal-ball")
def test_unlisted_component():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail():
    assert False

def test_passes():
    pass
"""


def test_a_skip_fails_unless_it_names_an_optional_component(tmp_path):
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    (tmp_path / "test_module_skip.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_xyz')\n\ndef test_x():\n    pass\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            "--continue-on-collection-errors",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    outcome = {
        name: word
        for word, name in re.findall(r"^(PASSED|FAILED|SKIPPED|XFAIL|ERROR)\S* (?:\[\d+\] )?(\S+)", done.stdout, re.M)
    }
    inner = {k.split("::")[-1]: v for k, v in outcome.items() if "::" in k}
    assert inner["test_plain_skip"] == "FAILED"  # in the test body: a failure
    for name in ("test_skipif", "test_fixture_skip", "test_unlisted_component"):
        assert inner[name] == "ERROR", name  # in setup (marker, fixture): an error, which fails the run as well
    assert inner["test_xfail"] == "XFAIL" and inner["test_passes"] == "PASSED"
    assert "test_optional_component" not in inner  # the allowed skip stays a skip
    assert re.search(r"^SKIPPED \[1\] \S*test_inner.py:\d+: optional: cuda", done.stdout, re.M)
    assert outcome.get("test_module_skip.py") == "ERROR"  # a module-level skip is a collection error
    assert "every test must run in a clone" in done.stdout
    assert done.returncode == 1


# ---- item 1: `lookalike data omniglot` prepares what the Omniglot configs read ----


def test_data_omniglot_writes_the_tables_the_configs_read(tmp_path):
    done = run("data", "omniglot", "data/omniglot", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2720 images, 136 characters" in done.stdout and "136 pairs" in done.stdout
    for config in ("omniglot.yaml", "omniglot_oneshot.yaml", "omniglot_pairwise.yaml"):
        cfg = load_config(REPO / "configs" / config)
        table = load_table(tmp_path / cfg.data.table)  # checks every image exists
        assert len(table) == 2720 and table.frame["label"].nunique() == 136
    expected = import_folder(
        tmp_path / "data/omniglot" / OMNIGLOT_ROOT, 0.3, 0
    )  # the command the config headers used to give
    assert table.frame[["label", "split", "is_query"]].equals(expected.frame[["label", "split", "is_query"]])
    pairs = load_pairs(tmp_path / load_config(REPO / "configs" / "omniglot_adapt.yaml").adapt.pairs)
    assert len(pairs) == 136 and all(p.name.endswith("_01.png") for p in pairs.image_paths("left"))
    again = run("data", "omniglot", "data/omniglot", cwd=tmp_path)  # idempotent
    assert again.returncode == 0 and again.stdout == done.stdout


def test_an_interrupted_unpack_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    def broken(self, path=None, members=None, pwd=None):
        (Path(path) / OMNIGLOT_ROOT / "Balinese").mkdir(parents=True)  # some of it written, then the disk fills
        raise OSError("No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", broken)
    with pytest.raises(OSError):
        unpack_omniglot(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert len(prepare_omniglot(tmp_path).table) == 2720


# ---- item 5: docs/config.md lists every key, and cannot drift from the models ----


def test_config_page_is_generated_from_the_models():
    page = (REPO / "docs" / "config.md").read_text()
    assert page == config_page(), "docs/config.md is out of date: run `make config-docs` (python tools/config_docs.py)"


def test_config_page_lists_every_key_with_a_default_and_a_meaning():
    page = config_page()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.\[\]]+)` \| .+? \| `.*?` \| (.*) \|$", page, re.M)}
    for key in valid_keys():
        assert key in rows, key
        assert rows[key].strip(), f"{key}: no meaning; add a `# comment` beside the field in lookalike/config.py"
    for key in ("adapt.backbones[].layers", "train.loss.margin"):  # list items and nested sections too
        assert rows[key].strip()
    assert ("DataConfig", "table") in field_comments()


# ---- item 5: `lookalike config show` ----


def test_config_show_prints_every_default(tmp_path):
    done = run("config", "show")
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown == Config().model_dump(mode="json")
    flat = {f"{s}.{k}" for s, v in shown.items() if isinstance(v, dict) for k in v} | {
        k for k, v in shown.items() if not isinstance(v, dict)
    }
    assert {k for k in valid_keys() if k.count(".") <= 1} <= flat


def test_config_show_resolves_a_file_and_overrides_and_loads_back(tmp_path):
    args = [str(REPO / "configs" / "omniglot.yaml"), "train.epochs=3", "rerank=[kreciprocal, {icfrr: {kg: 10}}]"]
    done = run("config", "show", *args)
    assert done.returncode == 0, done.stderr
    expected = load_config(args[0], args[1:])
    assert done.stdout == config_yaml(expected)
    (tmp_path / "shown.yaml").write_text(done.stdout)
    assert load_config(tmp_path / "shown.yaml") == expected
    shown = yaml.safe_load(done.stdout)
    assert shown["train"]["epochs"] == 3 and shown["model"]["name"] == "resnet18" and shown["search"]["k"] == 100


def test_config_show_bad_key_is_one_line():
    done = run("config", "show", "train.epoch=3")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "unknown key 'train.epoch'" in done.stderr


# ---- item 5: every --help ends with where the config keys are documented ----


def all_commands(typer_app, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the app, e.g. ('train',), ('config', 'show')."""
    paths = [(*prefix, c.name or c.callback.__name__.replace("_", "-")) for c in typer_app.registered_commands]
    for group in typer_app.registered_groups:
        paths += [(*prefix, group.name)] + all_commands(group.typer_instance, (*prefix, group.name))
    return paths


def test_every_help_ends_with_where_config_keys_are_documented():
    cli._add_config_epilog(cli.app)
    commands = all_commands(cli.app)
    assert ("config", "show") in commands and ("data", "omniglot") in commands and ("train",) in commands
    runner = CliRunner()
    for path in [(), *commands]:
        done = runner.invoke(cli.app, [*path, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
        assert done.exit_code == 0, (path, done.output)
        last = [line.strip() for line in done.output.splitlines() if line.strip()][-1]
        assert "docs/config.md" in last and "lookalike config show" in last, path


def test_the_installed_command_help_names_the_config_page():
    done = subprocess.run(
        [LOOKALIKE, "extract", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert done.returncode == 0 and "docs/config.md" in done.stdout.strip().splitlines()[-1]
