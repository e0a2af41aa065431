"""The real `lookalike` command, end to end, in subprocesses: the pipeline, the demo, and its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import typer

from helpers import LOOKALIKE
from lookalike.cli import app
from lookalike.core.embeddings import Embeddings
from lookalike.core.results import RetrievalResults
from lookalike.data.folder import import_folder

FAST_MODEL = ["model.name=test_resnet", "model.pretrained=false", "data.image_size=32", "data.batch_size=32"]


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LOOKALIKE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
    )


def offline_env(home: Path) -> dict[str, str]:
    """This environment with the hub at a closed local port, no proxy and an empty weights cache: a machine offline."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("HF_")}
    return {
        **env,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_ETAG_TIMEOUT": "1",
        "HF_HOME": str(home),
        "TORCH_HOME": str(home),
    }


# float32 search against a float64 ranking: an untrained model's cosine distances lie ~1e-3 apart, neighbours ~1e-7
NEAR_TIE = 1e-5


def exact_distances(table: Path, embeddings: Path) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """The validation queries, the validation gallery and their float64 cosine distances [Q, G] computed from the
    written embeddings, a query's distance to itself inf (a query never retrieves itself)."""
    frame = pd.read_csv(table)
    val = frame[frame["split"] == "validation"]
    queries, gallery = val[val["is_query"]].reset_index(drop=True), val[val["is_gallery"]].reset_index(drop=True)
    written = Embeddings.load(embeddings)
    row = {path: i for i, path in enumerate(written.ids)}
    vectors = written.vectors.astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    distance = 1 - unit[[row[p] for p in queries["path"]]] @ unit[[row[p] for p in gallery["path"]]].T
    distance[queries["path"].to_numpy()[:, None] == gallery["path"].to_numpy()[None, :]] = np.inf
    return queries, gallery, distance


def assert_exact_top_k(results: RetrievalResults, gallery: pd.DataFrame, distance: np.ndarray) -> None:
    """Every list holds the k nearest gallery items in ascending order (up to float32 near-ties), never the query."""
    assert list(results.gallery_ids) == list(gallery["path"])
    listed = np.take_along_axis(distance, results.indices, axis=1)
    assert np.isfinite(listed).all()  # no query retrieves itself
    assert (np.diff(listed, axis=1) >= -NEAR_TIE).all()
    rest = distance.copy()
    np.put_along_axis(rest, results.indices, np.inf, axis=1)
    assert (listed[:, -1] <= rest.min(axis=1) + NEAR_TIE).all()  # nothing nearer was left out


def metrics_by_definition(
    results: RetrievalResults, queries: pd.DataFrame, gallery: pd.DataFrame, distance: np.ndarray
) -> dict[str, float]:
    """The means `evaluate` must report for these lists, by each metric's definition (Open Metric Learning's), one
    query at a time; a query's relevant items are the other gallery images of its label, cut-offs beyond k clamped."""
    k = results.k
    per_query: dict[str, list[float]] = {}
    for q, label in enumerate(queries["label"]):
        rel = gallery["label"].to_numpy()[results.indices[q]] == label
        n_rel = int(((gallery["label"] == label) & np.isfinite(distance[q])).sum())
        precision_at = np.cumsum(rel) / np.arange(1, k + 1)
        values = {f"cmc@{c}": float(rel[:c].any()) for c in (1, 5, 10)}
        values |= {f"precision@{c}": rel[:c].sum() / min(c, n_rel) for c in (5, 10)}
        values |= {f"map@{c}": precision_at[:c][rel[:c]].mean() if rel[:c].any() else 0.0 for c in (5, 10, 100)}
        values["map@all"] = precision_at[rel].sum() / n_rel
        values["r_precision"] = rel[: min(n_rel, k)].sum() / n_rel
        for name, value in values.items():
            per_query.setdefault(name, []).append(float(value))
    return {name: float(np.mean(values)) for name, values in per_query.items()}


def test_pipeline_import_extract_search_evaluate(omniglot_small, tmp_path):
    table = tmp_path / "table.csv"
    done = run("import-folder", omniglot_small, table, "--validation-fraction", "0.5", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert "160 images, 8 labels" in done.stdout
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data:\n  table: {table}\nextract:\n  output: {tmp_path}/emb.npz\nsearch:\n  output: {tmp_path}/res.npz\n  k: "
        "10\n"
        f"evaluate:\n  output: {tmp_path}/metrics.json\n  grid: {tmp_path}/grid.png\n  cmc_plot: {tmp_path}/cmc.png\n"
    )
    loops = {
        "extract": "embedding: 80/80 images done in ",
        "search": "searching: 1/1 query blocks done in ",
        "evaluate": "",
    }
    for step, loop in loops.items():
        done = run(step, cfg, *FAST_MODEL)
        assert done.returncode == 0, f"{step}: {done.stderr}"
        assert loop in done.stderr  # stderr is a pipe here: progress as plain lines
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_queries"] == 80
    queries, gallery, distance = exact_distances(table, tmp_path / "emb.npz")
    results = RetrievalResults.load(tmp_path / "res.npz")
    assert list(results.query_ids) == list(queries["path"]) and results.k == 10
    assert_exact_top_k(results, gallery, distance)
    expected = metrics_by_definition(results, queries, gallery, distance)
    assert sorted(metrics["means"]) == sorted(expected)
    for name, value in expected.items():
        assert metrics["means"][name] == pytest.approx(value, abs=1e-6), name
    assert "cmc@1" in done.stdout and "map@10" in done.stdout
    assert (tmp_path / "grid.png").stat().st_size > 1000 and (tmp_path / "cmc.png").stat().st_size > 1000


def test_bad_table_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "t.csv").write_text("label,path,split,is_query,is_gallery\n1,a.png,validation,maybe,True\n")
    done = run("extract", f"data.table={tmp_path / 't.csv'}", f"extract.output={tmp_path / 'e.npz'}", *FAST_MODEL)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "row 1 (line 2), column 'is_query'" in done.stderr and "'maybe'" in done.stderr
    assert not (tmp_path / "e.npz").exists()


def test_offline_pretrained_model_is_one_line(omniglot_small, tmp_path):
    table = tmp_path / "table.csv"
    import_folder(omniglot_small, validation_fraction=0.5).save(table)
    # the README's first model command, as a machine without internet runs it (tests/test_hub.py: at once, no retries)
    done = run(
        "extract",
        f"data.table={table}",
        f"extract.output={tmp_path / 'e.npz'}",
        "model.name=resnet18",
        "data.image_size=32",
        env=offline_env(tmp_path / "home"),
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "model.pretrained: could not download weights for resnet18 (http://127.0.0.1:9 unreachable" in done.stderr
    assert "use model.pretrained=false to train from scratch, or model.weights=PATH for a local file" in done.stderr
    assert not (tmp_path / "e.npz").exists()


# `lookalike extract ... extract.device=auto` (exit 0, the 80 validation rows): the single-process run of
# tests/test_shards.py::test_two_process_ddp_equals_one_process, which compares it with a DDP run too


def test_unknown_key_lists_the_valid_ones():
    done = run("search", "search.kk=3")
    assert done.returncode == 2
    assert "unknown key 'search.kk'" in done.stderr and "search.k," in done.stderr


def test_missing_table_key_is_explained():
    done = run("extract")
    assert done.returncode == 2 and "data.table: expected the path of a dataset CSV" in done.stderr


def command_tree(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command of the typer app as (words after `lookalike`, click command): groups, then their sub-commands."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not sub.hidden:
            yield from command_tree(sub, (*path, name))


COMMANDS = dict(command_tree(typer.main.get_command(app)))


def test_the_command_list_is_the_apps_own():
    """The help test below covers what `lookalike` offers, so a new command is covered without editing a list."""
    assert {"import-folder", "convert", "adapt", "train-reranker", "extract-pairs", "data", "config"} <= {
        words[0] for words in COMMANDS if words
    }
    assert ("data", "omniglot") in COMMANDS and ("config", "show") in COMMANDS


@pytest.mark.parametrize("words", list(COMMANDS), ids=lambda words: " ".join(words) or "lookalike")
def test_every_command_has_help(words):
    """`lookalike ... --help` exits 0 with a usage line naming the command, every option and argument, and every
    sub-command of a group."""
    command = COMMANDS[words]
    done = run(*words, "--help")
    assert done.returncode == 0, done.stderr
    assert f"Usage: lookalike {' '.join(words)}".rstrip() in done.stdout, done.stdout
    for param in command.params:
        if not getattr(param, "hidden", False):
            named = param.opts[0] if param.param_type_name == "option" else param.name
            assert named in done.stdout, f"{' '.join(words)} --help does not name {named}:\n{done.stdout}"
    for name, sub in getattr(command, "commands", {}).items():
        assert sub.hidden or name in done.stdout, f"{' '.join(words)} --help does not list {name}"


STAGE_LINE = re.compile(r"^stage (.+): (CMC@1|mAP@all) ([\d.]+) -> ([\d.]+) \(([+-][\d.]+) points\)$", re.MULTILINE)


SHORT_DEMO = (  # the demo's own options at a CI budget: the stages are what is checked, not how much they gain
    "model.name=test_resnet",
    "data.image_size=32",
    "train.epochs=1",
    "train.val_every=1",
    "train.batches_per_epoch=2",
    "--pairwise",
    "train.epochs=1",
    "--pairwise",
    "train.val_every=1",
    "--pairwise",
    "train.batches_per_epoch=2",
    "--pairwise",
    "pairwise.batch_size=64",  # training batches of 64 pairs, not the demo's 256
)


def test_demo_on_omniglot_prints_a_line_for_every_stage(tmp_path):
    """The shipped demo's stages on a CI budget (a tiny model, a few steps each): one gain line per stage that matches
    the metrics files, every query evaluated against the whole gallery, the pictures. Whether each stage of the full
    demo gains is measured by benchmarks/bench_demo.py (docs/benchmarks.md), not here: it takes minutes."""
    done = run("demo", "--out", tmp_path / "demo", "trainer.progress=false", *SHORT_DEMO, timeout=900)
    assert done.returncode == 0, done.stderr
    stages = STAGE_LINE.findall(done.stdout)
    assert [s[0] for s in stages] == [
        "trained extractor",
        "k-reciprocal re-ranking",
        "STIR pairwise re-ranker (top 5)",
    ], done.stdout
    for name, _, before, after, points in stages:
        assert float(points) == pytest.approx(100 * (float(after) - float(before)), abs=0.11), name
    out = tmp_path / "demo"
    untrained = json.loads((out / "metrics_untrained.json").read_text())
    assert float(stages[0][2]) == pytest.approx(untrained["means"]["cmc@1"], abs=5e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_evaluated"] == metrics["n_queries"] == 820 and metrics["complete_ranking"]  # 41 characters x 20
    assert float(stages[0][3]) == pytest.approx(metrics["means"]["cmc@1"], abs=5e-4)
    reranked = json.loads((out / "metrics_rerank.json").read_text())
    assert list(reranked)[:3] == ["original", "1:kreciprocal", "2:pairwise"]
    assert reranked["2:pairwise"]["means"]["cmc@1"] == pytest.approx(float(stages[2][3]), abs=5e-4)
    for picture in ("grid.png", "cmc.png"):
        assert f"picture: {out / picture}" in done.stdout and (out / picture).stat().st_size > 1000


def test_demo_keeps_the_digits_as_an_option(tmp_path):
    done = run(
        "demo",
        "--dataset",
        "digits",
        "--no-rerank",
        "--out",
        tmp_path,
        "model.name=test_resnet",
        "data.image_size=32",
        "train.epochs=1",
        "train.batches_per_epoch=2",
        "trainer.progress=false",
    )
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "digits").glob("*/*.png"))) == 1797
    assert (
        STAGE_LINE.findall(done.stdout)[0][0] == "trained extractor" and (tmp_path / "metrics_untrained.json").is_file()
    )


ICFRR_EXAMPLE = Path(__file__).resolve().parent / "data" / "icfrr_example" / "-1"


def test_icfrr_command_prints_every_iteration_and_writes_the_plot(tmp_path):
    done = run("icfrr", ICFRR_EXAMPLE, "--kg", "10", "--kq", "15", "--n-times", "20", "--output", tmp_path)
    assert done.returncode == 0, done.stderr
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert [round(r["map@all"], 4) for r in records][::6] == [0.5758, 0.798, 0.798, 1.0]  # iterations 0, 6, 12, 18
    assert "0.7431" in done.stdout and (tmp_path / "icfrr_curve.png").stat().st_size > 1000


def test_icfrr_command_names_a_missing_cache_file(tmp_path):
    done = run("icfrr", tmp_path)
    assert done.returncode != 0 and "qg_dists.pth" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_search_k_above_the_gallery_is_clamped_in_one_line(omniglot_small, tmp_path):
    """Was: search.k=5000 silently padded every list to 5000 columns."""
    from lookalike.core.table import load_table

    import_folder(omniglot_small, validation_fraction=0.5, seed=1).save(tmp_path / "table.csv")
    paths = load_table(tmp_path / "table.csv").frame["path"].to_numpy(str)
    Embeddings(np.random.default_rng(0).standard_normal((len(paths), 8)).astype(np.float32), paths).save(
        tmp_path / "emb.npz"
    )
    done = run(
        "search",
        f"data.table={tmp_path / 'table.csv'}",
        f"extract.output={tmp_path / 'emb.npz'}",
        f"search.output={tmp_path / 'res.npz'}",
        "search.k=5000",
    )
    assert done.returncode == 0, done.stderr
    clamp = "warning: search.k: 5000 is more than the 79 gallery items a query may see; the lists hold 79"
    assert [line for line in done.stderr.splitlines() if "search.k" in line] == [
        clamp
    ]  # one line (beside progress lines)
    assert "top-79 of 80 queries" in done.stdout and RetrievalResults.load(tmp_path / "res.npz").k == 79
