"""Public dataset converters on tiny replicas of each published layout: counts, roles, boxes, sequences, domains,
errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from helpers import LOOKALIKE
from lookalike.core.errors import LookalikeError
from lookalike.core.protocol import exclusion_groups
from lookalike.core.table import load_table
from lookalike.data.convert import CONVERTERS, conversion_problems, convert
from lookalike.data.pairs import load_pairs


def image(path: Path, value: int = 128, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)


def by_path(conversion):
    """The converted table's rows indexed by image path."""
    return conversion.table.frame.set_index("path")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- Stanford Online Products ---------------------------------------------------------------------------------


@pytest.fixture
def sop(tmp_path) -> Path:
    """Ebay_train.txt (classes 1, 2 of bicycle) and Ebay_test.txt (classes 3 chair, 4 kettle), two images each."""
    root = tmp_path / "Stanford_Online_Products"
    rows = {"train": [(1, 1, "bicycle"), (2, 1, "bicycle")], "test": [(3, 2, "chair"), (4, 3, "kettle")]}
    image_id = 0
    for split, classes in rows.items():
        lines = ["image_id class_id super_class_id path"]
        for class_id, super_id, name in classes:
            for k in range(2):
                image_id += 1
                rel = f"{name}_final/{100 + class_id}_{k}.JPG"
                image(root / rel, 40 * class_id + k)
                lines.append(f"{image_id} {class_id} {super_id} {rel}")
        write(root / f"Ebay_{split}.txt", "\n".join(lines) + "\n")
    return root


def test_sop(sop):
    conversion = convert("sop", sop)
    frame = conversion.table.frame
    assert conversion.counts() == {"images": 8, "labels": 4, "train": 4, "validation": 4, "queries": 4, "gallery": 4}
    test = frame[frame["split"] == "validation"]
    assert set(test["label"]) == {3, 4} and test["is_query"].all() and test["is_gallery"].all()
    assert set(frame["category"]) == {"bicycle", "chair", "kettle"}
    assert not frame.loc[frame["split"] == "train", "is_query"].any()
    assert conversion_problems(conversion, decode=True) == ([], 8)


def test_sop_wrong_header_and_short_line(sop):
    text = (sop / "Ebay_test.txt").read_text()
    write(sop / "Ebay_test.txt", text.replace("image_id class_id", "id class"))
    with pytest.raises(
        LookalikeError, match=r"Ebay_test\.txt, line 1: expected the header 'image_id class_id super_class_id path'"
    ):
        convert("sop", sop)
    write(sop / "Ebay_test.txt", text + "9 5 chair_final/x.JPG\n")
    with pytest.raises(
        LookalikeError,
        match=r"Ebay_test\.txt, line 6: expected 4 fields \(image_id class_id super_class_id path\), got 3",
    ):
        convert("sop", sop)
    write(sop / "Ebay_test.txt", text + "9 five 2 chair_final/x.JPG\n")
    with pytest.raises(LookalikeError, match=r"line 6, column 'class_id': expected an integer, got 'five'"):
        convert("sop", sop)


def test_missing_annotation_file_names_what_was_looked_for(tmp_path):
    with pytest.raises(LookalikeError, match=r"Ebay_train\.txt not found \(looked for Ebay_train\.txt\)"):
        convert("sop", tmp_path)


# --- DeepFashion In-shop ----------------------------------------------------------------------------------------

INSHOP = [  # image, item, status, bbox
    ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "id_00000001", "train", (1, 2, 9, 8)),
    ("img/WOMEN/Dresses/id_00000001/01_2_side.jpg", "id_00000001", "train", (0, 0, 12, 10)),
    ("img/MEN/Denim/id_00000002/01_1_front.jpg", "id_00000002", "query", (2, 1, 11, 9)),
    ("img/MEN/Denim/id_00000002/02_1_front.jpg", "id_00000002", "gallery", (3, 3, 7, 7)),
    ("img/MEN/Denim/id_00000003/01_1_front.jpg", "id_00000003", "gallery", (1, 1, 5, 5)),
]


@pytest.fixture
def inshop(tmp_path) -> Path:
    """Eval/list_eval_partition.txt and Anno/list_bbox_inshop.txt with their count and header lines; Img/img/..."""
    root = tmp_path / "inshop"
    for i, (name, *_rest) in enumerate(INSHOP):
        image(root / "Img" / name, 30 * i)
    partition = [str(len(INSHOP)), "image_name item_id evaluation_status"] + [
        f"{n}  {item}  {status}" for n, item, status, _ in INSHOP
    ]
    write(root / "Eval" / "list_eval_partition.txt", "\n".join(partition) + "\n")
    boxes = [str(len(INSHOP)), "image_name clothes_type pose_type x_1 y_1 x_2 y_2"]
    boxes += [f"{n}  1  2  {' '.join(map(str, box))}" for n, _, _, box in INSHOP]
    write(root / "Anno" / "list_bbox_inshop.txt", "\n".join(boxes) + "\n")
    return root


def test_inshop(inshop):
    conversion = convert("inshop", inshop)
    frame = by_path(conversion)
    assert conversion.counts() == {"images": 5, "labels": 3, "train": 2, "validation": 3, "queries": 1, "gallery": 2}
    query = frame.loc["img/MEN/Denim/id_00000002/01_1_front.jpg"]
    assert query["is_query"] and not query["is_gallery"] and query["label"] == "id_00000002"
    assert frame.loc["img/MEN/Denim/id_00000003/01_1_front.jpg", "is_gallery"]
    assert frame.loc["img/WOMEN/Dresses/id_00000001/01_1_front.jpg", ["x_1", "y_1", "x_2", "y_2"]].tolist() == [
        1,
        2,
        9,
        8,
    ]
    assert frame.loc["img/MEN/Denim/id_00000002/01_1_front.jpg", "category"] == "MEN/Denim"
    assert conversion.table.root == inshop / "Img" and all(p.is_file() for p in conversion.table.image_paths())


def test_inshop_count_line_catches_a_cut_list(inshop):
    path = inshop / "Eval" / "list_eval_partition.txt"
    write(path, "\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(
        LookalikeError, match=r"list_eval_partition\.txt, line 1: announces 5 rows, found 4 \(incomplete download\?\)"
    ):
        convert("inshop", inshop)


def test_inshop_unknown_status_and_missing_box(inshop):
    path = inshop / "Eval" / "list_eval_partition.txt"
    write(path, path.read_text().replace("gallery\n", "galery\n", 1))
    with pytest.raises(
        LookalikeError, match=r"line 6, column 'evaluation_status': expected train or query or gallery, got 'galery'"
    ):
        convert("inshop", inshop)
    write(path, path.read_text().replace("galery\n", "gallery\n"))
    boxes = inshop / "Anno" / "list_bbox_inshop.txt"
    lines = boxes.read_text().splitlines()
    write(boxes, "\n".join(["4", *lines[1:3], *lines[4:]]) + "\n")
    with pytest.raises(
        LookalikeError,
        match=r"list_bbox_inshop\.txt: no line for image_name img/WOMEN/Dresses/id_00000001/01_2_side\.jpg "
        r"\(.*list_eval_partition\.txt, line 4\)",
    ):
        convert("inshop", inshop)


# --- CUB-200-2011 -----------------------------------------------------------------------------------------------


@pytest.fixture
def cub(tmp_path) -> Path:
    """CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, bounding_boxes.txt (x y width
    height)."""
    root = tmp_path / "CUB_200_2011"
    classes = {
        1: "001.Black_footed_Albatross",
        2: "002.Laysan_Albatross",
        101: "101.White_Pelican",
        200: "200.Common_Yellowthroat",
    }
    images, labels, split, boxes = [], [], [], []
    for class_id, folder in classes.items():
        for k in range(2):
            n = len(images) + 1
            rel = f"{folder}/{folder[4:]}_{k:04d}_{n}.jpg"
            image(root / "images" / rel, n * 20)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {class_id}")
            split.append(f"{n} {k}")
            boxes.append(f"{n} {n}.0 2.0 5.0 {6 + k}.0")
    for name, lines in (
        ("images", images),
        ("image_class_labels", labels),
        ("train_test_split", split),
        ("bounding_boxes", boxes),
    ):
        write(root / f"{name}.txt", "\n".join(lines) + "\n")
    return root


def test_cub(cub):
    conversion = convert("cub", cub.parent)  # the folder holding CUB_200_2011/ works too
    frame = conversion.table.frame
    assert conversion.counts() == {"images": 8, "labels": 4, "train": 4, "validation": 4, "queries": 4, "gallery": 4}
    assert set(frame.loc[frame["split"] == "train", "label"]) == {1, 2}
    assert set(frame.loc[frame["split"] == "validation", "label"]) == {101, 200}
    third = frame.iloc[2]
    assert third["path"].startswith("images/002.Laysan_Albatross/") and [
        third[c] for c in ("x_1", "y_1", "x_2", "y_2")
    ] == [3.0, 2.0, 8.0, 8.0]
    assert conversion.table.root == cub and all(p.is_file() for p in conversion.table.image_paths())


def test_cub_image_without_label(cub):
    path = cub / "image_class_labels.txt"
    write(path, "\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(
        LookalikeError,
        match=r"image_class_labels\.txt: no line for image_id 8 \(.*images\.txt, line 8\); 1 of 8 missing",
    ):
        convert("cub", cub)


# --- Stanford Cars-196 ------------------------------------------------------------------------------------------

ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def save_annotations(path: Path, rows: list[tuple[int, int, int, int, int, str]]) -> None:
    """An `annotations` 1 x N struct array as in the devkit (uint16 boxes, uint8 class, char file name)."""
    ann = np.zeros((1, len(rows)), dtype=[(f, object) for f in ANNOTATION_FIELDS])
    for i, (x1, y1, x2, y2, cls, fname) in enumerate(rows):
        ann[0, i] = (
            *(np.array([[v]], np.uint16) for v in (x1, y1, x2, y2)),
            np.array([[cls]], np.uint8),
            np.array([fname]),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"annotations": ann})


@pytest.fixture
def cars(tmp_path) -> Path:
    """devkit/cars_train_annos.mat, devkit/cars_meta.mat, cars_test_annos_withlabels.mat; cars_train/ and cars_test/."""
    root = tmp_path / "cars"
    train = [(1, 2, 10, 8, 1, "00001.jpg"), (0, 0, 11, 9, 99, "00002.jpg"), (2, 2, 6, 6, 1, "00003.jpg")]
    test = [(3, 1, 9, 9, 99, "00001.jpg"), (1, 1, 5, 5, 196, "00002.jpg"), (1, 1, 4, 4, 2, "00003.jpg")]
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        for i, row in enumerate(rows):
            image(root / folder / row[-1], 50 * i)
    save_annotations(root / "devkit" / "cars_train_annos.mat", train)
    save_annotations(root / "cars_test_annos_withlabels.mat", test)
    scipy.io.savemat(
        root / "devkit" / "cars_meta.mat",
        {"class_names": np.array([[f"Make {i} 2012" for i in range(1, 197)]], dtype=object)},
    )
    return root


def test_cars(cars):
    conversion = convert("cars", cars)
    frame = by_path(conversion)
    assert conversion.counts() == {"images": 6, "labels": 4, "train": 3, "validation": 3, "queries": 3, "gallery": 3}
    assert (
        frame.loc["cars_train/00002.jpg", "label"] == 99 and frame.loc["cars_train/00002.jpg", "split"] == "validation"
    )
    assert frame.loc["cars_test/00003.jpg", "split"] == "train"
    assert frame.loc["cars_test/00001.jpg", ["x_1", "y_1", "x_2", "y_2"]].tolist() == [3, 1, 9, 9]
    assert conversion_problems(conversion) == ([], 6)


def test_cars_class_outside_meta_and_bad_mat(cars):
    save_annotations(cars / "cars_test_annos_withlabels.mat", [(1, 1, 5, 5, 197, "00001.jpg")])
    with pytest.raises(
        LookalikeError, match=r"cars_test_annos_withlabels\.mat: annotation 1 has class 197; expected 1\.\.196"
    ):
        convert("cars", cars)
    write(cars / "cars_test_annos_withlabels.mat", "not a mat file")
    with pytest.raises(LookalikeError, match=r"cars_test_annos_withlabels\.mat: not a readable MATLAB \.mat file"):
        convert("cars", cars)


# --- Market-1501 and DukeMTMC-reID --------------------------------------------------------------------------------

MARKET = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg",
        "0002_c2s1_000301_01.jpg",
        "0007_c3s3_077419_03.jpg",
        "-1_c1s1_000401_04.jpg",
    ],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c2s1_000976_00.jpg"],
    "bounding_box_test": [
        "0001_c1s1_001151_01.jpg",  # same person, same camera as the query: excluded by the protocol
        "0001_c3s1_000551_02.jpg",  # same person, another camera: the match
        "0003_c4s1_002001_01.jpg",
        "0000_c2s1_000000_00.jpg",  # distractor: kept
        "-1_c1s1_000000_00.jpg",  # junk: dropped
    ],
}


@pytest.fixture
def market(tmp_path) -> Path:
    root = tmp_path / "Market-1501-v15.09.15"
    for folder, names in MARKET.items():
        for i, name in enumerate(names):
            image(root / folder / name, 20 * i)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0\1")
    return root


def test_market(market):
    conversion = convert("market1501", market)
    frame = by_path(conversion)
    assert conversion.counts() == {"images": 9, "labels": 5, "train": 3, "validation": 6, "queries": 2, "gallery": 4}
    assert not any(p.split("/")[-1].startswith("-1_") for p in frame.index)
    assert conversion.notes == ["dropped 2 junk images (pid -1)", "kept 1 distractor images (pid 0) in the gallery"]
    distractor = frame.loc["bounding_box_test/0000_c2s1_000000_00.jpg"]
    assert distractor["label"] == 0 and distractor["is_gallery"] and not distractor["is_query"]
    assert (
        frame.loc["query/0001_c1s1_001051_00.jpg", "sequence"]
        == frame.loc["bounding_box_test/0001_c1s1_001151_01.jpg", "sequence"]
    )
    q_ids = np.array(["query/0001_c1s1_001051_00.jpg"])
    g_ids = np.array(
        [
            "bounding_box_test/0001_c1s1_001151_01.jpg",
            "bounding_box_test/0001_c3s1_000551_02.jpg",
            "bounding_box_test/0000_c2s1_000000_00.jpg",
        ]
    )
    q_group, g_group = exclusion_groups(conversion.table, q_ids, g_ids)
    assert (g_group == q_group[0]).tolist() == [True, False, False]  # only same person + same camera is excluded


def test_duke_names_and_bad_name(tmp_path):
    root = tmp_path / "DukeMTMC-reID"
    for folder, names in {
        "bounding_box_train": ["0005_c2_f0046985.jpg", "0005_c5_f0051781.jpg"],
        "query": ["0005_c2_f0046985.jpg"],
        "bounding_box_test": ["0005_c2_f0046999.jpg", "0005_c6_f0058000.jpg"],
    }.items():
        for name in names:
            image(root / folder / name)
    frame = convert("dukemtmc", root).table.frame.set_index("path")
    assert (
        frame.loc["query/0005_c2_f0046985.jpg", "sequence"]
        == frame.loc["bounding_box_test/0005_c2_f0046999.jpg", "sequence"]
        == "5_c2"
    )
    assert frame.loc["bounding_box_test/0005_c6_f0058000.jpg", "sequence"] == "5_c6"
    image(root / "query" / "person5.jpg")
    with pytest.raises(LookalikeError, match=r"query/person5\.jpg: expected a name PID_cCAM\.\.\."):
        convert("dukemtmc", root)


# --- Street2Shop / DeepFashion2 consumer-to-shop (COCO-style JSON) -------------------------------------------------


def coco(images: list[dict], annotations: list[dict]) -> str:
    return json.dumps(
        {"info": {}, "images": images, "annotations": annotations, "categories": [{"id": 1, "name": "skirt"}]}
    )


@pytest.fixture
def deepfashion2(tmp_path) -> Path:
    """train.json + validation.json with DeepFashion2 fields (source on the image; pair_id, style, COCO bbox on
    items)."""
    root = tmp_path / "DeepFashion2"
    splits = {
        "train": [("000001.jpg", "user", [(1, 1, [0, 0, 5, 5])]), ("000002.jpg", "shop", [(1, 1, [1, 1, 6, 6])])],
        "validation": [
            (
                "000001.jpg",
                "user",
                [(7, 1, [1, 1, 3, 3]), (7, 2, [0, 0, 8, 6])],
            ),  # two items: the larger (style 2) labels it
            ("000002.jpg", "shop", [(7, 2, [2, 2, 4, 4])]),
            ("000003.jpg", "shop", [(7, 1, [1, 1, 2, 2])]),
            ("000004.jpg", "user", [(8, 0, [1, 1, 2, 2])]),  # style 0: no shop counterpart, dropped
        ],
    }
    for split, rows in splits.items():
        images, annotations = [], []
        for i, (name, source, items) in enumerate(rows, 1):
            image(root / split / "image" / name, 40 * i)
            images.append({"id": i, "file_name": name, "width": 12, "height": 10, "source": source})
            for pair_id, style, box in items:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i,
                        "pair_id": pair_id,
                        "style": style,
                        "bbox": box,
                        "category_id": 1,
                    }
                )
        write(root / f"{split}.json", coco(images, annotations))
    return root


def test_deepfashion2(deepfashion2):
    conversion = convert("deepfashion2", deepfashion2)
    frame = by_path(conversion)
    counts = conversion.counts()
    assert counts == {
        "images": 5,
        "labels": 3,
        "train": 2,
        "validation": 3,
        "queries": 1,
        "gallery": 2,
        "domain shop": 3,
        "domain user": 2,
    }
    user = frame.loc["validation/image/000001.jpg"]
    assert user["is_query"] and not user["is_gallery"] and user["domain"] == "user" and user["label"] == "7_2"
    assert [user[c] for c in ("x_1", "y_1", "x_2", "y_2")] == [0, 0, 8, 6]
    assert (
        frame.loc["validation/image/000002.jpg", "label"] == "7_2"
        and frame.loc["validation/image/000002.jpg", "is_gallery"]
    )
    assert "validation/image/000004.jpg" not in frame.index
    assert conversion.notes == ["dropped 1 images without a retrievable item (no annotation, or style 0)"]


def test_street2shop_query_and_gallery_files(tmp_path):
    """query.json / gallery.json (the CTL COCO-ReID split) without source or style: the file says user or shop."""
    root = tmp_path / "street2shop"
    for split, names in (("query", ["q1.jpg", "q2.jpg"]), ("gallery", ["g1.jpg", "g2.jpg", "g3.jpg"])):
        for name in names:
            image(root / split / name)
        images = [{"id": i, "file_name": n} for i, n in enumerate(names)]
        annotations = [
            {"id": i, "image_id": i, "pair_id": 100 + i % 2, "bbox": [0, 0, 4, 4]} for i in range(len(names))
        ]
        write(root / "annotations" / f"{split}.json", coco(images, annotations))
    conversion = convert("street2shop", root)
    frame = by_path(conversion)
    assert conversion.counts()["queries"] == 2 and conversion.counts()["gallery"] == 3
    assert frame.loc["query/q2.jpg", "domain"] == "user" and frame.loc["query/q2.jpg", "label"] == 101
    assert frame.loc["gallery/g3.jpg", "domain"] == "shop" and frame.loc["gallery/g3.jpg", "label"] == 100
    write(
        root / "annotations" / "gallery.json",
        coco([{"id": 0, "file_name": "g1.jpg"}], [{"id": 0, "image_id": 0, "bbox": [0, 0, 1, 1]}]),
    )
    with pytest.raises(
        LookalikeError, match=r"gallery\.json: annotations\[0\]: expected an object with the field 'pair_id'"
    ):
        convert("street2shop", root)


def test_consumer2shop_needs_a_source(deepfashion2):
    data = json.loads((deepfashion2 / "validation.json").read_text())
    data["images"][1]["source"] = "store"
    write(deepfashion2 / "validation.json", json.dumps(data))
    with pytest.raises(
        LookalikeError, match=r"validation\.json: image '000002\.jpg': expected a source 'user' or 'shop'.*got 'store'"
    ):
        convert("deepfashion2", deepfashion2)
    write(deepfashion2 / "validation.json", "{not json")
    with pytest.raises(LookalikeError, match=r"validation\.json: not a readable JSON file"):
        convert("deepfashion2", deepfashion2)


# --- Sketchy and TU-Berlin ----------------------------------------------------------------------------------------


@pytest.fixture
def sketchy(tmp_path) -> Path:
    """sketch/tx_000000000000/<class>/<photo>-N.png and photo/tx_000000000000/<class>/<photo>.jpg for three classes."""
    root = tmp_path / "Sketchy" / "256x256"
    for c, cls in enumerate(("airplane", "cat", "dog")):
        for k in range(2):
            photo = f"n0{c}_{k}"
            image(root / "photo" / "tx_000000000000" / cls / f"{photo}.jpg", 30 * c + k)
            for s in (1, 2):
                image(root / "sketch" / "tx_000000000000" / cls / f"{photo}-{s}.png", 200)
    return root


def test_sketchy_with_zero_shot_split(sketchy, tmp_path):
    split = write(tmp_path / "sketchy_zeroshot.txt", "# unseen classes\ncat\n\ndog  # comment\n")
    conversion = convert("sketchy", sketchy, class_split=split)
    frame = conversion.table.frame
    val = frame[frame["split"] == "validation"]
    assert set(val["label"]) == {"cat", "dog"} and set(frame.loc[frame["split"] == "train", "label"]) == {"airplane"}
    assert (val["is_query"] == (val["domain"] == "sketch")).all() and (
        val["is_gallery"] == (val["domain"] == "photo")
    ).all()
    assert conversion.counts() == {
        "images": 18,
        "labels": 3,
        "train": 6,
        "validation": 12,
        "queries": 8,
        "gallery": 4,
        "domain photo": 6,
        "domain sketch": 12,
    }
    assert "sketch/tx_000000000000/cat/n01_0-1.png" in set(frame["path"])


def test_sketchy_split_errors(sketchy, tmp_path):
    with pytest.raises(LookalikeError, match=r"zs\.txt, line 2: class 'zebra' is not a class folder of the dataset"):
        convert("sketchy", sketchy, class_split=write(tmp_path / "zs.txt", "cat\nzebra\n"))
    conversion = convert("sketchy", sketchy)
    assert conversion.counts()["train"] == 0 and "no --class-split" in conversion.notes[0]
    image(sketchy / "sketch" / "tx_000000000000" / "zebra" / "z-1.png")
    with pytest.raises(LookalikeError, match=r"class 'zebra' has only sketches"):
        convert("sketchy", sketchy)
    with pytest.raises(LookalikeError, match=r"--seed: not an option of sketchy \(it takes --class-split\)"):
        convert("sketchy", sketchy, seed=3)


def test_tu_berlin(tmp_path):
    root = tmp_path / "TUBerlin"
    for cls in ("alarm clock", "bear"):
        for k in range(3):
            image(root / "png" / cls / f"{k}.png", 255)
        image(root / "ImageResized" / cls / f"photo{cls[0]}.JPEG")
    frame = convert("tu-berlin", root, class_split=write(tmp_path / "split.txt", "bear\n")).table.frame
    bear = frame[frame["label"] == "bear"]
    assert (bear["split"] == "validation").all() and bear["is_query"].sum() == 3 and bear["is_gallery"].sum() == 1
    assert set(frame.loc[frame["label"] == "alarm clock", "split"]) == {"train"}


def icfrr_lists(root: Path, folder: str, prefix: str, split: str, rows: list[tuple[str, int]]) -> None:
    """One of ICFRR's file lists ('<path> <class number>' lines) and the images it names."""
    for path, _ in rows:
        image(root / path, 200 if "sketch" in path or "png" in path else 60)
    write(root / folder / f"{prefix}_filelist_{split}.txt", "".join(f"{path} {number}\n" for path, number in rows))


@pytest.fixture
def sketchy_icfrr(tmp_path) -> Path:
    """ICFRR's Sketchy: 256x256/{sketch,photo}/tx_000000000000_ready/<class>/, EXTEND_image_sketchy_ready/, and file
    lists
    of two zero-shot splits (zeroshot1: cat unseen; zeroshot2: dog unseen), class numbers restarting in each list."""
    root = tmp_path / "Sketchy"
    sketch, photo = "256x256/sketch/tx_000000000000_ready", "256x256/photo/tx_000000000000_ready"
    for folder, unseen, seen in (
        ("zeroshot1", "cat", ("dog", "sea turtle")),
        ("zeroshot2", "dog", ("cat", "sea turtle")),
    ):
        for split, classes in (("train", seen), ("zero", (unseen,))):
            icfrr_lists(
                root,
                folder,
                "sketch_tx_000000000000_ready",
                split,
                [(f"{sketch}/{c}/n0{i}_1-{k}.png", i) for i, c in enumerate(classes) for k in (1, 2)],
            )
            icfrr_lists(
                root,
                folder,
                "all_photo",
                split,
                [(f"{photo}/{c}/n0{i}_1.jpg", i) for i, c in enumerate(classes)]
                + [(f"EXTEND_image_sketchy_ready/{c}/ext_{i}.jpg", i) for i, c in enumerate(classes)],
            )
    return root


def test_sketchy_in_icfrr_layout_reads_the_chosen_zero_shot_split(sketchy_icfrr):
    with pytest.raises(
        LookalikeError,
        match=r"ICFRR's zero-shot splits zeroshot1, zeroshot2 are here; choose one with --class-split \(zs1, zs2\)",
    ):
        convert("sketchy", sketchy_icfrr)
    for split, unseen in (("zs1", "cat"), ("zs2", "dog"), ("zeroshot2", "dog")):
        conversion = convert("sketchy", sketchy_icfrr, class_split=Path(split))
        frame = conversion.table.frame
        val = frame[frame["split"] == "validation"]
        assert set(val["label"]) == {unseen} and unseen not in set(frame.loc[frame["split"] == "train", "label"])
        assert conversion.counts() == {
            "images": 12,
            "labels": 3,
            "train": 8,
            "validation": 4,
            "queries": 2,
            "gallery": 2,
            "domain photo": 6,
            "domain sketch": 6,
        }
        assert f"EXTEND_image_sketchy_ready/{unseen}/ext_0.jpg" in set(val.loc[val["is_gallery"], "path"])
        assert conversion_problems(conversion)[0] == [] and "read ICFRR's file lists" in conversion.notes[0]
    assert set(
        convert("sketchy", sketchy_icfrr, class_split=sketchy_icfrr / "zeroshot1").table.frame.query("is_query")[
            "label"
        ]
    ) == {"cat"}


def test_sketchy_icfrr_layout_errors(sketchy_icfrr, tmp_path):
    with pytest.raises(LookalikeError, match=r"--class-split zs3: no zs3/ folder|zs3"):
        convert("sketchy", sketchy_icfrr, class_split=Path("zs3"))
    (sketchy_icfrr / "zeroshot2" / "all_photo_filelist_zero.txt").write_text(
        "256x256/photo/tx_000000000000_ready/dog/n00_1.jpg\n"
    )
    with pytest.raises(
        LookalikeError,
        match=r"all_photo_filelist_zero\.txt, line 1: expected '<image path> <class number>', got '256x256/photo/",
    ):
        convert("sketchy", sketchy_icfrr, class_split=Path("zs2"))
    (sketchy_icfrr / "zeroshot2" / "all_photo_filelist_zero.txt").unlink()
    with pytest.raises(
        LookalikeError,
        match=r"zeroshot2: expected ICFRR's file lists \(sketch_tx_000000000000_ready_filelist_zero\.txt, "
        r"all_photo_filelist_zero\.txt\)",
    ):
        convert("sketchy", sketchy_icfrr, class_split=Path("zs2"))
    conversion = convert("sketchy", sketchy_icfrr)  # one split left: read without --class-split
    assert set(conversion.table.frame.query("is_query")["label"]) == {"cat"}
    frame = convert(
        "sketchy", sketchy_icfrr, class_split=write(tmp_path / "unseen.txt", "dog\n")
    ).table.frame  # class folders
    assert "256x256/sketch/tx_000000000000_ready/dog/n00_1-1.png" in set(frame.loc[frame["is_query"], "path"])


def test_tu_berlin_in_icfrr_layout_with_the_cli(tmp_path):
    """png_ready/ and ImageResized_ready/ with zeroshot/ lists: read without --class-split (its only split)."""
    root = tmp_path / "TUBerlin"
    icfrr_lists(
        root, "zeroshot", "png_ready", "train", [("png_ready/airplane/1.png", 0), ("png_ready/airplane/2.png", 0)]
    )
    icfrr_lists(root, "zeroshot", "ImageResized_ready", "train", [("ImageResized_ready/airplane/n1 copy.JPEG", 0)])
    icfrr_lists(
        root, "zeroshot", "png_ready", "zero", [("png_ready/alarm clock/3.png", 0), ("png_ready/bear/4.png", 1)]
    )
    icfrr_lists(
        root,
        "zeroshot",
        "ImageResized_ready",
        "zero",
        [("ImageResized_ready/alarm clock/a.JPEG", 0), ("ImageResized_ready/bear/b.JPEG", 1)],
    )
    done = subprocess.run(
        [LOOKALIKE, "convert", "tu-berlin", str(root), str(tmp_path / "tub.csv")],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "7 images, 3 labels, 3 train, 4 validation, 2 queries, 2 gallery" in done.stdout
    frame = load_table(tmp_path / "tub.csv").frame.set_index("path")  # paths relative to the table's folder
    assert frame.loc["TUBerlin/ImageResized_ready/airplane/n1 copy.JPEG", "split"] == "train"
    sketch = frame.loc["TUBerlin/png_ready/alarm clock/3.png"]
    assert sketch["label"] == "alarm clock" and sketch["is_query"] and sketch["domain"] == "sketch"


# --- Totally-Looks-Like pairs and the generic folder --------------------------------------------------------------


@pytest.fixture
def tll(tmp_path) -> Path:
    root = tmp_path / "TLL"
    for i in range(6):
        image(root / "left" / f"{i:05d}.jpg", 10 * i)
        image(root / "right" / f"{i:05d}.jpg", 255 - 10 * i)
    return root


def test_tll_pairs_table_round_trips(tll, tmp_path):
    conversion = convert("tll", tll, validation_fraction=0.5, seed=1)
    assert conversion.counts() == {"pairs": 6, "train": 3, "validation": 3}
    frame = conversion.table.frame
    assert (frame["left"].str.replace("left/", "") == frame["right"].str.replace("right/", "")).all()
    conversion.table.save(tmp_path / "out" / "pairs.csv")
    again = load_pairs(tmp_path / "out" / "pairs.csv")
    assert again.frame["split"].tolist() == frame["split"].tolist()
    assert [p.resolve() for p in again.image_paths("right")] == [
        p.resolve() for p in conversion.table.image_paths("right")
    ]
    (tll / "right" / "00002.jpg").write_bytes(b"")
    problems, n_checked = conversion_problems(conversion)
    assert n_checked == 12 and [(p.path, p.reason) for p in problems] == [("right/00002.jpg", "empty file")]


def test_tll_mismatches_are_named(tll):
    image(tll / "left" / "extra_left.jpg")
    (tll / "right" / "00003.jpg").unlink()
    with pytest.raises(LookalikeError, match=r"2 in left/ have no partner in right/ \(00003\.jpg, extra_left\.jpg\)$"):
        convert("tll", tll)
    image(tll / "right" / "00003.jpg")
    image(tll / "right" / "only_right.jpg")
    with pytest.raises(
        LookalikeError,
        match=r"1 in left/ .*\(extra_left\.jpg\); 1 in right/ have no partner in left/ \(only_right\.jpg\)",
    ):
        convert("tll", tll)


def test_folder_delegates_to_the_importer(market):
    conversion = convert("folder", market, validation_fraction=0.5, seed=0)
    assert conversion.counts()["images"] == sum(len(v) for v in MARKET.values())
    with pytest.raises(LookalikeError, match=r"unknown dataset 'nope'; expected one of sop, inshop, cub"):
        convert("nope", market)


# --- the command --------------------------------------------------------------------------------------------------


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([LOOKALIKE, "convert", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_names_missing_and_truncated_images_and_writes_nothing(sop, tmp_path):
    (sop / "chair_final/103_1.JPG").unlink()
    truncated = sop / "kettle_final/104_0.JPG"
    truncated.write_bytes(truncated.read_bytes()[:200])
    out = tmp_path / "sop.csv"
    done = run("sop", sop, out, "--check-images")
    assert done.returncode == 2 and not out.exists()
    assert "8 images, 4 labels, 4 train, 4 validation, 4 queries, 4 gallery" in done.stdout
    assert "1 of 8 images missing: " in done.stderr and "chair_final/103_1.JPG" in done.stderr
    assert (
        "1 of 8 images unreadable: " in done.stderr
        and "kettle_final/104_0.JPG (cannot read image (truncated or corrupt" in done.stderr
    )
    assert list(tmp_path.glob("*.csv*")) == []  # no temporary file left either
    done = run("sop", sop, out)  # without --check-images only the missing one is found
    assert done.returncode == 2 and "missing" in done.stderr and "unreadable" not in done.stderr and not out.exists()


def test_cli_writes_a_loadable_table(sop, tmp_path):
    out = tmp_path / "tables" / "sop.csv"
    done = run("sop", sop, out, "--check-images")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    table = load_table(out)
    assert len(table) == 8 and all(p.is_file() for p in table.image_paths())


def test_cli_option_errors_are_one_line(sop, tmp_path):
    done = run("sop", sop, tmp_path / "x.csv", "--class-split", tmp_path / "c.txt")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "--class-split: not an option of sop (it takes no options)" in done.stderr


def test_cli_help_lists_every_converter():
    done = subprocess.run(
        [LOOKALIKE, "convert", "--help"], capture_output=True, text=True, timeout=60, env={"COLUMNS": "400", "PATH": ""}
    )
    assert all(name in done.stdout for name in CONVERTERS)
