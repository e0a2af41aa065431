"""Result grids: each cell's rank, whole label and rounded distance under it, and a legend for the frame colours;
checked on the drawn text of the matplotlib figure, not on pixels."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_hex

from lookalike.core.results import PAD, RetrievalResults
from lookalike.data.folder import import_folder
from lookalike.viz import QUERY, RIGHT, WRONG, format_distance, result_grid_figure, save_result_grid, table_labels


@pytest.fixture(scope="module")
def table(omniglot_small):
    return import_folder(omniglot_small, validation_fraction=0.5, seed=0)


@pytest.fixture
def results(table) -> RetrievalResults:
    """Two queries over the table's images: an image found at float-noise distance, ordinary distances and an empty
    slot."""
    paths = table.frame["path"].to_numpy()
    indices = np.array([[0, 1, 25, 40], [21, 22, 2, PAD]])
    distances = np.array([[-1.19e-07, 0.123456, 0.5, 12345.6], [4e-7, 0.0004567, 1.0, np.inf]], np.float32)
    return RetrievalResults(indices, distances, paths[[0, 21]], paths)


def captions(fig) -> list[list[str]]:
    """The text under every cell, row by row."""
    columns = fig.axes[0].get_subplotspec().get_gridspec().ncols
    texts = [ax.xaxis.label.get_text() for ax in fig.axes]
    return [texts[i : i + columns] for i in range(0, len(texts), columns)]


def legend(fig) -> list[tuple[str, str]]:
    """(text, frame colour) of every legend entry."""
    (box,) = fig.legends
    return [
        (text.get_text(), to_hex(handle.get_edgecolor())) for text, handle in zip(box.get_texts(), box.legend_handles)
    ]


def test_distances_round_to_three_digits_and_noise_to_zero():
    assert [format_distance(d) for d in (-1.19e-07, 9.9e-7, 0.123456, -0.32949, 12345.6, 1e-4, np.inf)] == [
        "0",
        "0",
        "0.123",
        "-0.329",
        "1.23e+04",
        "0.0001",
        "inf",
    ]


def test_grid_shows_rank_label_distance_and_a_legend(table, results, tmp_path):
    relevance = np.array([[True, True, False, False], [True, False, False, False]])
    labels = table_labels(table, results)
    fig = result_grid_figure(results, table.root, relevance, top_k=4, labels=labels)
    rows = captions(fig)
    label = table.frame["label"].to_numpy()
    assert rows[0] == [
        f"query\n{label[0]}",
        f"#1  {label[0]}\nd = 0",
        f"#2  {label[1]}\nd = 0.123",
        f"#3  {label[25]}\nd = 0.5",
        f"#4  {label[40]}\nd = 1.23e+04",
    ]
    assert rows[1] == [
        f"query\n{label[21]}",
        f"#1  {label[21]}\nd = 0",
        f"#2  {label[22]}\nd = 0.000457",
        f"#3  {label[2]}\nd = 1",
        "",
    ]
    assert label[0].startswith("Balinese/character") and not any("e-0" in text for row in rows for text in row)
    assert legend(fig) == [("query", QUERY), ("match (same label)", RIGHT), ("not a match", WRONG)]
    assert (
        to_hex(fig.axes[1].spines["top"].get_edgecolor()) == RIGHT
        and to_hex(fig.axes[3].spines["top"].get_edgecolor()) == WRONG
    )
    path = save_result_grid(results, tmp_path / "grid.png", table.root, relevance, top_k=4, labels=labels)
    assert path.stat().st_size > 5_000


def test_long_labels_wrap_whole_unjudged_grids_say_so_and_scores_are_labelled(table, results):
    long = "Alphabet_of_the_Magi/character-with-a-rather-long-name_17"
    labels = (np.array([long, long]), np.array([long] * len(results.gallery_ids)))
    fig = result_grid_figure(results, table.root, top_k=2, cell_size=64, labels=labels, scores=True)
    query, first, _ = captions(fig)[0]
    lines = query.split("\n")
    assert (
        "".join(lines).replace(" ", "") == "query" + long and len(lines) > 2 and max(map(len, lines)) <= 16
    )  # nothing lost
    assert first.startswith("#1  Alphabet") and first.endswith("\nscore = 0")
    assert captions(fig)[1][2].endswith("\nscore = -0.000457")  # ICFRR: score = -distance, higher is better
    assert legend(fig) == [("query", QUERY), ("not judged (no labels)", "#7f7f7f")]


def test_table_labels_follow_the_results_ids(table, results):
    query, gallery = table_labels(
        table,
        RetrievalResults(
            results.indices,
            results.distances,
            np.array(["a/missing.png", results.query_ids[1]]),
            results.gallery_ids[::-1],
        ),
    )
    label = table.frame["label"].to_numpy()
    assert query.tolist() == ["", label[21]] and gallery.tolist() == label[::-1].tolist()
