"""Hardened image loading: bad files named, every mode to RGB, EXIF rotation, bbox clipping, non-UTF-8 names,
skipping."""

from __future__ import annotations

import io
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import LOOKALIKE
from lookalike.config import load_config
from lookalike.core.errors import ImageError, LookalikeError, LookalikeWarning
from lookalike.core.table import load_table
from lookalike.data.check import describe_problems, skip_bad_images, table_image_problems
from lookalike.data.decode import read_image, verify_image
from lookalike.data.folder import import_folder
from lookalike.data.images import ImageDataset, eval_transform
from lookalike.pipeline import table_from_config


def jpeg_bytes(size=(40, 30), color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    return tuple(int(v) for v in img.getpixel(xy))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(lambda: b"", r"cannot read image \(empty file\)", id="empty"),
        pytest.param(
            lambda: jpeg_bytes()[:300], r"cannot read image \(truncated or corrupt \(OSError: ", id="truncated-jpeg"
        ),
        pytest.param(lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 40, r"cannot read image \(", id="corrupt-png"),
        pytest.param(
            lambda: b"hello, not an image", r"cannot read image \(not an image Pillow can decode\)", id="text"
        ),
    ],
)
def test_bad_files_are_named_errors(tmp_path, content, match):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content())
    for load in (read_image, verify_image):
        with pytest.raises(ImageError, match=rf"bad\.jpg: {match}") as info:
            load(path)
        assert "\n" not in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(LookalikeError, match=r"nope\.png: cannot read image \(no such file\)"):
        read_image(tmp_path / "nope.png")


def test_truncated_png_is_caught_by_the_cheap_check(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        verify_image(tmp_path / "a.png")


def test_modes_become_8bit_rgb(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    rgba.save(tmp_path / "rgba.png")
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=0)
    grey16 = np.array([[0, 32896, 65535, 257]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(tmp_path / "float.tif")
    Image.new("LA", (2, 2), (90, 255)).save(tmp_path / "la.png")
    Image.new("1", (2, 2), 1).save(tmp_path / "bw.png")

    red = read_image(tmp_path / "cmyk.jpg")
    assert red.mode == "RGB" and pixel(red)[0] > 240 and max(pixel(red)[1:]) < 15
    img = read_image(tmp_path / "rgba.png")
    assert (
        img.mode == "RGB" and pixel(img) == (255, 255, 255) and pixel(img, (1, 1)) == (10, 20, 30)
    )  # transparency over white
    assert pixel(read_image(tmp_path / "p.png")) == (0, 255, 0)  # palette index 1; index 0 is transparent
    grey = np.asarray(read_image(tmp_path / "grey16.png"))
    assert grey.dtype == np.uint8 and grey[0, :, 0].tolist() == [0, 128, 255, 1]  # scaled, not clipped to white
    assert np.asarray(read_image(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 128, 255]
    assert pixel(read_image(tmp_path / "la.png")) == (90, 90, 90)
    assert pixel(read_image(tmp_path / "bw.png")) == (255, 255, 255)


def exif_rotated(path: Path) -> None:
    """A 40x20 image, left half red and right half blue, stored with EXIF orientation 6 (display rotated 90°
    clockwise)."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif.tobytes(), quality=100)


def test_exif_rotation_is_applied(tmp_path):
    exif_rotated(tmp_path / "r.jpg")
    img = read_image(tmp_path / "r.jpg")
    assert img.size == (20, 40)  # upright: portrait
    assert pixel(img, (10, 5))[0] > 200 and pixel(img, (10, 35))[2] > 200  # red on top, blue below
    crop = read_image(tmp_path / "r.jpg", np.array([0, 25, 20, 40]))  # a bbox of the upright image: the blue bottom
    assert crop.size == (20, 15) and pixel(crop, (10, 7))[2] > 200
    verify_image(
        tmp_path / "r.jpg", np.array([0, 25, 20, 40])
    )  # inside the upright 20 x 40, though outside the stored 40 x 20


def test_bbox_is_clipped_or_rejected(tmp_path):
    Image.new("RGB", (30, 20), (1, 2, 3)).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png", np.array([-5, 10, 50, 40])).size == (30, 10)
    assert read_image(tmp_path / "a.png", np.array([np.nan] * 4)).size == (30, 20)
    for load in (read_image, verify_image):
        with pytest.raises(
            ImageError,
            match=r"a\.png: bbox \(x_1, y_1, x_2, y_2\) = \[31\.0, 0\.0, 40\.0, 5\.0\] lies outside the 30x20 image",
        ):
            load(tmp_path / "a.png", np.array([31, 0, 40, 5]))


def test_non_utf8_file_names_round_trip(tmp_path):
    root = tmp_path / "tree"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (5, 5)).save(root / cls / f"{k}.png")
    latin1 = os.fsencode(root / "cats") + b"/caf\xe9.png"  # a Latin-1 name, not valid UTF-8
    Image.new("RGB", (5, 5), (9, 9, 9)).save(os.fsdecode(latin1), "PNG")
    table = import_folder(root, validation_fraction=0.5, seed=0)
    table.save(tmp_path / "t.csv")
    again = load_table(tmp_path / "t.csv")
    path = next(p for p in again.image_paths() if "caf" in str(p))
    assert os.fsencode(path).endswith(b"caf\xe9.png")
    assert pixel(read_image(path)) == (9, 9, 9)
    assert table_image_problems(again, decode=True) == []
    with pytest.raises(ImageError, match=r"caf\\xe9\.png: bbox"):  # printable in messages
        read_image(path, np.array([10, 10, 20, 20]))


def test_image_dataset_names_the_bad_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "cut.jpg").write_bytes(jpeg_bytes()[:200])
    (tmp_path / "t.csv").write_text(
        "label,path,split,is_query,is_gallery\n1,ok.png,validation,1,1\n1,cut.jpg,validation,1,1\n"
    )
    data = ImageDataset(load_table(tmp_path / "t.csv"), eval_transform(8))
    assert data[0][0].shape == (3, 8, 8)
    with pytest.raises(LookalikeError, match=r"cut\.jpg: cannot read image \(truncated"):
        data[1]


@pytest.fixture
def partly_bad(tmp_path) -> Path:
    """A table of 6 images: one missing, one truncated, one empty, one whose bbox misses it, two good ones."""
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (10, 10), (50, 60, 70)).save(tmp_path / name)
    (tmp_path / "cut.jpg").write_bytes(jpeg_bytes()[:200])
    (tmp_path / "empty.png").write_bytes(b"")
    rows = [
        "label,path,split,is_query,is_gallery,x_1,y_1,x_2,y_2",
        "1,a.png,validation,1,1,,,,",
        "1,b.png,validation,1,1,0,0,5,5",
        "2,c.png,validation,1,1,20,20,30,30",
        "2,cut.jpg,validation,1,1,,,,",
        "3,empty.png,validation,1,1,,,,",
        "3,gone.png,validation,1,1,,,,",
    ]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "t.csv"


def test_problems_are_found_and_described(partly_bad):
    table = load_table(partly_bad, check_files=False)
    assert [p.reason for p in table_image_problems(table)] == ["empty file", "missing"]  # existence only: no decoding
    problems = table_image_problems(table, decode=True)
    assert [p.path for p in problems] == ["c.png", "cut.jpg", "empty.png", "gone.png"]  # named as the table writes them
    lines = describe_problems(problems, len(table), shown=2)
    assert lines[0].startswith("1 of 6 images missing: ") and lines[0].endswith("gone.png")
    assert (
        lines[1].startswith("3 of 6 images unreadable: ")
        and "c.png (bbox" in lines[1]
        and lines[1].endswith(", and 1 more")
    )


def test_skip_bad_images_drops_and_warns(partly_bad):
    cfg = load_config(None, [f"data.table={partly_bad}", "data.skip_bad_images=true"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = table_from_config(cfg)
    assert table.frame["path"].tolist() == ["a.png", "b.png"]
    assert len(caught) == 1 and issubclass(caught[0].category, LookalikeWarning)
    assert str(caught[0].message).startswith("skipped 4 bad images (data.skip_bad_images=true): 1 of 6 images missing")
    with pytest.raises(LookalikeError, match=r"row 6 \(line 7\), column 'path': image file not found: .*gone\.png"):
        table_from_config(load_config(None, [f"data.table={partly_bad}"]))


def test_skip_bad_images_with_nothing_left_is_an_error(tmp_path):
    (tmp_path / "t.csv").write_text("label,path,split,is_query,is_gallery\n1,x.png,train,,\n")
    with pytest.raises(
        LookalikeError, match=r"no usable image \(data.skip_bad_images=true\): 1 of 1 images missing: .*x\.png"
    ):
        skip_bad_images(load_table(tmp_path / "t.csv", check_files=False))


def test_cli_prints_the_skip_warning_and_carries_on(partly_bad, tmp_path):
    args = [
        f"data.table={partly_bad}",
        "data.skip_bad_images=true",
        f"extract.output={tmp_path / 'e.npz'}",
        "model.name=test_resnet",
        "model.pretrained=false",
        "data.image_size=16",
    ]
    done = subprocess.run([LOOKALIKE, "extract", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "warning: skipped 4 bad images" in done.stderr and "2 embeddings" in done.stdout
    done = subprocess.run([LOOKALIKE, "extract", *args[:1], *args[2:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "gone.png" in done.stderr and done.stderr.strip().count("\n") == 0
