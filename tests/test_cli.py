"""The real `lookalike` command, end to end, in subprocesses: the pipeline, the demo, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LOOKALIKE = str(Path(sys.executable).parent / "lookalike")
FAST_MODEL = ["model.name=test_resnet", "model.pretrained=false", "data.image_size=32", "data.batch_size=32"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LOOKALIKE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_pipeline_import_extract_search_evaluate(omniglot_small, tmp_path):
    table = tmp_path / "table.csv"
    done = run("import-folder", omniglot_small, table, "--validation-fraction", "0.5", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert "160 images, 8 labels" in done.stdout
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data:\n  table: {table}\nextract:\n  output: {tmp_path}/emb.npz\nsearch:\n  output: {tmp_path}/res.npz\n  k: 10\n"
        f"evaluate:\n  output: {tmp_path}/metrics.json\n  grid: {tmp_path}/grid.png\n  cmc_plot: {tmp_path}/cmc.png\n"
    )
    loops = {"extract": "embedding: 3/3 batches done in ", "search": "searching: 1/1 query blocks done in ", "evaluate": ""}
    for step, loop in loops.items():
        done = run(step, cfg, *FAST_MODEL)
        assert done.returncode == 0, f"{step}: {done.stderr}"
        assert loop in done.stderr  # stderr is a pipe here: progress as plain lines
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_queries"] == 80 and 0 <= metrics["means"]["cmc@1"] <= 1
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


def test_unknown_key_lists_the_valid_ones():
    done = run("search", "search.kk=3")
    assert done.returncode == 2
    assert "unknown key 'search.kk'" in done.stderr and "search.k," in done.stderr


def test_missing_table_key_is_explained():
    done = run("extract")
    assert done.returncode == 2 and "data.table: expected the path of a dataset CSV" in done.stderr


@pytest.mark.parametrize("command", ["import-folder", "extract", "search", "evaluate", "rerank", "icfrr", "index", "serve", "demo", "train", "validate"])
def test_every_command_has_help(command):
    done = run(command, "--help")
    assert done.returncode == 0 and "Usage" in done.stdout


def test_demo_on_digits_writes_metrics_and_pictures(tmp_path):
    done = run("demo", "--out", tmp_path / "demo", "model.name=test_resnet", "data.image_size=32", "trainer.progress=false")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "demo"
    assert len(list((out / "digits").glob("*/*.png"))) == 1797
    metrics = json.loads((out / "metrics.json").read_text())
    untrained = json.loads((out / "metrics_untrained.json").read_text())
    assert metrics["n_evaluated"] == metrics["n_queries"] > 500
    assert metrics["complete_ranking"]
    assert "untrained" in done.stdout and "trained (3 epochs)" in done.stdout
    assert metrics["means"]["map@all"] > untrained["means"]["map@all"] + 0.05  # a minute of training helps on unseen digits
    assert list((out / "train" / "checkpoints").glob("best-*.ckpt"))
    assert "re-ranked top 5" in done.stdout and (out / "pairwise" / "checkpoints" / "last.ckpt").is_file()  # the STIR step
    for picture in ("grid.png", "cmc.png"):
        assert f"picture: {out / picture}" in done.stdout


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
