"""Importing a class-per-folder image tree: labels, split by class, query/gallery roles, errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lookalike.core.errors import TableError
from lookalike.core.table import load_table
from lookalike.data.folder import import_folder

ALPHABETS = ("Balinese", "Greek")
CHARACTERS = 4  # per alphabet: 8 classes in all
IMAGES = 3  # per character


def png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), value).save(path)


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/<alphabet>/characterNN/NN_k.png; the same character names recur in both alphabets."""
    root = tmp_path / "images"
    for alphabet in ALPHABETS:
        for c in range(1, CHARACTERS + 1):
            for k in range(IMAGES):
                png(root / alphabet / f"character{c:02d}" / f"{c:02d}_{k}.png", 10 * c + k)
    return root


def val_classes(frame: pd.DataFrame) -> set[str]:
    return set(frame.loc[frame["split"] == "validation", "label"])


def one_line_error(match: str, *args, **kwargs) -> TableError:
    with pytest.raises(TableError, match=match) as info:
        import_folder(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def test_labels_are_leaf_folder_paths(tree):
    table = import_folder(tree)
    frame = table.frame
    assert len(table) == len(ALPHABETS) * CHARACTERS * IMAGES
    expected = {f"{a}/character{c:02d}" for a in ALPHABETS for c in range(1, CHARACTERS + 1)}
    assert set(frame["label"]) == expected  # Balinese/character01 and Greek/character01 are different classes
    assert frame["label"].value_counts().eq(IMAGES).all()
    assert "Balinese/character02/02_1.png" in set(frame["path"])
    for label, path in zip(frame["label"], frame["path"]):
        assert Path(path).parent.as_posix() == label
        assert not Path(path).is_absolute()
    assert table.root == tree
    assert all(p.is_file() for p in table.image_paths())


def test_deeper_and_shallower_class_folders(tmp_path):
    png(tmp_path / "a" / "x.png")
    png(tmp_path / "a" / "y.png")
    png(tmp_path / "b" / "c" / "d" / "x.png")
    png(tmp_path / "b" / "c" / "d" / "y.png")
    frame = import_folder(tmp_path).frame
    assert sorted(set(frame["label"])) == ["a", "b/c/d"]


def test_only_image_extensions_are_imported(tree):
    (tree / "Greek" / "character01" / "notes.txt").write_text("not an image")
    (tree / "Greek" / "character01" / "README").write_text("")
    png(tree / "Greek" / "character01" / "UPPER.PNG")
    frame = import_folder(tree).frame
    paths = set(frame["path"])
    assert "Greek/character01/UPPER.PNG" in paths
    assert not any(p.endswith(("notes.txt", "README")) for p in paths)
    assert len(frame) == len(ALPHABETS) * CHARACTERS * IMAGES + 1


def test_extensions_argument(tree):
    (tree / "Greek" / "character01" / "extra.jpg").write_bytes(b"")
    frame = import_folder(tree, extensions=(".jpg",)).frame
    assert frame["path"].tolist() == ["Greek/character01/extra.jpg"]


def test_split_is_by_class(tree):
    frame = import_folder(tree, validation_fraction=0.5, seed=0).frame
    train = set(frame.loc[frame["split"] == "train", "label"])
    val = val_classes(frame)
    assert train and val
    assert not train & val
    assert len(val) == round(0.5 * len(ALPHABETS) * CHARACTERS)
    assert set(frame["split"]) == {"train", "validation"}


@pytest.mark.parametrize(("fraction", "n_val"), [(0.25, 2), (0.01, 1), (0.99, 7)])
def test_validation_fraction_counts_classes(tree, fraction, n_val):
    frame = import_folder(tree, validation_fraction=fraction).frame
    assert len(val_classes(frame)) == n_val  # at least one each side when both are asked for


def test_validation_fraction_edges(tree):
    assert (import_folder(tree, validation_fraction=0.0).frame["split"] == "train").all()
    everything = import_folder(tree, validation_fraction=1.0).frame
    assert (everything["split"] == "validation").all()
    assert everything["is_query"].all() and everything["is_gallery"].all()


def test_split_is_deterministic_per_seed(tree):
    first = import_folder(tree, seed=3).frame
    again = import_folder(tree, seed=3).frame
    pd.testing.assert_frame_equal(first, again)
    others = [val_classes(import_folder(tree, seed=s).frame) for s in range(4, 9)]
    assert any(o != val_classes(first) for o in others)


def test_validation_rows_are_query_and_gallery_by_default(tree):
    frame = import_folder(tree).frame
    is_val = frame["split"] == "validation"
    assert frame.loc[is_val, "is_query"].all() and frame.loc[is_val, "is_gallery"].all()
    assert not frame.loc[~is_val, "is_query"].any() and not frame.loc[~is_val, "is_gallery"].any()
    assert frame["is_query"].dtype == bool


def test_queries_per_class_one(tree):
    frame = import_folder(tree, queries_per_class=1, seed=1).frame
    val = frame[frame["split"] == "validation"]
    assert val.groupby("label")["is_query"].sum().eq(1).all()
    assert (val["is_gallery"] == ~val["is_query"]).all()  # the rest are gallery only
    assert val.groupby("label")["is_gallery"].sum().eq(IMAGES - 1).all()
    train = frame[frame["split"] == "train"]
    assert not train["is_query"].any() and not train["is_gallery"].any()
    again = import_folder(tree, queries_per_class=1, seed=1).frame
    pd.testing.assert_frame_equal(frame, again)


def test_queries_per_class_two(tree):
    val = import_folder(tree, queries_per_class=2).frame.query("split == 'validation'")
    assert val.groupby("label")["is_query"].sum().eq(2).all()
    assert val.groupby("label")["is_gallery"].sum().eq(1).all()


def test_queries_per_class_must_be_positive(tree):
    one_line_error(r"queries_per_class: expected a positive integer, got 0", tree, queries_per_class=0)


def test_queries_covering_whole_classes_leave_no_gallery(tree):
    one_line_error(r"validation rows have no gallery", tree, queries_per_class=IMAGES)


def test_imported_table_saves_and_reloads(tree):
    table = import_folder(tree, queries_per_class=1)
    out = tree / "table.csv"
    table.save(out)
    again = load_table(out)
    pd.testing.assert_frame_equal(again.frame, table.frame, check_dtype=False)
    assert again.image_paths() == table.image_paths()


def test_omniglot_subset(omniglot_small):
    frame = import_folder(omniglot_small, seed=0).frame
    assert frame["label"].nunique() == 8
    assert len(frame) == 160
    assert all(label.startswith("Balinese/character0") for label in frame["label"])
    assert len(val_classes(frame)) == 4


# --- errors --------------------------------------------------------------------------------


def test_not_a_folder(tmp_path):
    one_line_error(r"missing: not a folder of images$", tmp_path / "missing")
    file = tmp_path / "file.png"
    png(file)
    one_line_error(r"file\.png: not a folder of images$", file)


def test_no_images(tmp_path):
    one_line_error(r"no images found \(looked for \.png, \.jpg", tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.txt").write_text("x")
    one_line_error(r"no images found", tmp_path)


def test_image_directly_in_root(tree):
    png(tree / "loose.png")
    one_line_error(
        r"loose\.png: image directly in the root folder; expected root/<class folder>/<image> \(or --no-labels: a "
        r"gallery without labels\)$",
        tree,
    )


@pytest.mark.parametrize("fraction", [1.5, -0.1, float("nan")])
def test_bad_validation_fraction(tree, fraction):
    one_line_error(r"^validation_fraction: expected a number in \[0, 1\], got ", tree, validation_fraction=fraction)
