"""Converters from the published layouts of public datasets to lookalike tables, by name (`CONVERTERS`)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

from lookalike.core.errors import LookalikeError
from lookalike.data.check import ImageProblem, find_image_problems, table_image_problems
from lookalike.data.convert.base import Conversion
from lookalike.data.convert.cars import convert_cars
from lookalike.data.convert.consumer2shop import convert_deepfashion2, convert_street2shop
from lookalike.data.convert.cub import convert_cub
from lookalike.data.convert.inshop import convert_inshop
from lookalike.data.convert.reid import convert_duke, convert_market
from lookalike.data.convert.sketch import convert_sketchy, convert_tu_berlin
from lookalike.data.convert.sop import convert_sop
from lookalike.data.convert.tll import convert_tll
from lookalike.data.decode import display_path
from lookalike.data.folder import import_folder
from lookalike.data.pairs import PairsTable


def convert_folder(
    root: Path, validation_fraction: float = 0.5, seed: int = 0, queries_per_class: int | None = None
) -> Conversion:
    """A class-per-folder tree (the `import-folder` importer)."""
    return Conversion(import_folder(root, validation_fraction, seed, queries_per_class))


CONVERTERS: dict[str, Callable[..., Conversion]] = {
    "sop": convert_sop,
    "inshop": convert_inshop,
    "cub": convert_cub,
    "cars": convert_cars,
    "market1501": convert_market,
    "dukemtmc": convert_duke,
    "street2shop": convert_street2shop,
    "deepfashion2": convert_deepfashion2,
    "sketchy": convert_sketchy,
    "tu-berlin": convert_tu_berlin,
    "tll": convert_tll,
    "folder": convert_folder,
}


def options_of(name: str) -> list[str]:
    """The keyword options a converter takes (e.g. class_split, validation_fraction)."""
    return [p for p in inspect.signature(CONVERTERS[name]).parameters if p != "root"]


def convert(name: str, root: str | os.PathLike, **options) -> Conversion:
    """Convert the dataset at `root` with the converter `name`; options left None are not passed."""
    if name not in CONVERTERS:
        raise LookalikeError(f"unknown dataset {name!r}; expected one of {', '.join(CONVERTERS)}")
    root = Path(root)
    if not root.is_dir():
        raise LookalikeError(f"{display_path(root)}: not a folder; expected the root of the {name} dataset")
    given = {k: v for k, v in options.items() if v is not None}
    unknown = [k for k in given if k not in options_of(name)]
    if unknown:
        takes = ", ".join(f"--{o.replace('_', '-')}" for o in options_of(name)) or "no options"
        raise LookalikeError(f"--{unknown[0].replace('_', '-')}: not an option of {name} (it takes {takes})")
    return CONVERTERS[name](root, **given)


def conversion_problems(conversion: Conversion, decode: bool = False) -> tuple[list[ImageProblem], int]:
    """The missing (and with `decode`, unreadable) images a conversion refers to, and how many images were checked."""
    table = conversion.table
    if isinstance(table, PairsTable):
        paths = table.image_paths("left") + table.image_paths("right")
        return find_image_problems(paths, decode=decode, names=[*table.column("left"), *table.column("right")]), len(
            paths
        )
    return table_image_problems(table, decode), len(table)


__all__ = ["CONVERTERS", "Conversion", "conversion_problems", "convert", "options_of"]
