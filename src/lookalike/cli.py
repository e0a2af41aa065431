"""The `lookalike` command: parses arguments, calls the library, prints results. No logic of its own."""

from __future__ import annotations

import functools
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from lookalike import __version__
from lookalike.core.errors import LookalikeError, LookalikeWarning, printable
from lookalike.progress import INTERVAL_ENV, ProgressReporter, interval_from_env, plural

app = typer.Typer(
    help="Image retrieval: import a dataset, extract embeddings, search a gallery, evaluate the ranking.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ARGS_HELP = "An optional YAML config, then key=value overrides (e.g. model.name=resnet18 data.root=/data/sop)."


@dataclass
class _Output:
    """The global flags: -q (no progress, no info lines), -v (debug lines), the progress line interval."""

    quiet: bool = False
    verbose: bool = False
    interval: float = interval_from_env()
    started: float = time.perf_counter()


_output = _Output()


def _print_version(value: bool) -> None:
    """--version: `lookalike X.Y.Z`, then exit."""
    if value:
        out.print(f"lookalike {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Print no progress and no info lines (warnings, errors and exit codes stay)."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also print debug lines: the resolved settings and how long each step took."
    ),
    progress_seconds: float = typer.Option(
        interval_from_env(),
        "--progress-seconds",
        min=0.01,
        envvar=INTERVAL_ENV,
        help="Seconds between progress lines when stderr is not a terminal (a log file, a pipe); a terminal gets bars.",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Image retrieval: import a dataset, extract embeddings, search a gallery, evaluate the ranking."""
    _output.quiet, _output.verbose, _output.interval = quiet, verbose and not quiet, progress_seconds
    out.quiet = quiet
    _output.started = time.perf_counter()
    ctx.call_on_close(lambda: _debug(f"{ctx.invoked_subcommand} finished"))


def _debug(message: str) -> None:
    """A -v line on stderr, stamped with the seconds since the command started."""
    if _output.verbose:
        err.print(
            f"[dim]debug [{time.perf_counter() - _output.started:7.1f} s][/] {escape(printable(message))}",
            highlight=False,
            soft_wrap=True,
        )


def _one_line(exc: BaseException) -> str:
    """The error's own message: the last line of a message wrapped by a DataLoader worker, else the first."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(exc):
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else exc.__class__.__name__


def reports_errors(fn):
    """Turn a LookalikeError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LookalikeError as exc:
            err.print(f"[bold red]error:[/] {escape(printable(_one_line(exc)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A LookalikeWarning (e.g. images skipped) as one 'warning:' line; other warnings as Python shows them."""
    if issubclass(category, LookalikeWarning):
        err.print(f"[yellow]warning:[/] {escape(printable(str(message)))}", highlight=False, soft_wrap=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning, warnings.showwarning = warnings.showwarning, _show_warning


def _quiet_lightning() -> None:
    """Keep Lightning's banners and tips and a deprecation warning from inside Lightning off the terminal (logs stay
    complete)."""
    import logging

    signals = (
        "lightning.pytorch.trainer.connectors.signal_connector"  # "Received SIGTERM": the CLI says it in its own line
    )
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", signals):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")


def _config(args: list[str] | None):
    from lookalike.config import load_config

    args = list(args or [])
    path = args.pop(0) if args and "=" not in args[0] else None
    if _output.quiet and not any(a.startswith("trainer.progress=") for a in args):
        args.append("trainer.progress=false")  # -q: no Lightning progress bar either
    cfg = load_config(path, args)
    if _output.verbose:
        from lookalike.provenance import changed_settings

        _debug(
            f"config {path or '(defaults)'} + {len(args)} overrides; settings other than the defaults: "
            + (", ".join(f"{k}={v}" for k, v in changed_settings(cfg).items()) or "none")
        )
    return cfg


def _progress(desc: str, unit: str = "batch"):
    """The CLI's progress for one loop: a bar on a terminal, a line every few seconds in a log, nothing under -q."""
    reporter = ProgressReporter(sys.stderr, _output.interval, enabled=not _output.quiet)
    track = reporter.track(desc, unit)

    def timed(iterable, total):
        _debug(f"{desc}: {total} {plural(unit)} to go")
        return track(iterable, total)

    return timed


def _print_report(report, title: str = "metrics") -> None:
    out.print(f"[bold]{title}[/]: {report.n_evaluated} of {report.n_queries} queries evaluated")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report.means.items():
        table.add_row(name, f"{value:.4f}")
    out.print(table)
    if report.no_relevant_ids:
        shown = ", ".join(report.no_relevant_ids[:5])
        out.print(
            f"[yellow]{len(report.no_relevant_ids)} queries have no relevant gallery item and were excluded[/] "
            f"({shown}{', ...' if len(report.no_relevant_ids) > 5 else ''})"
        )
    if not report.complete_ranking:
        out.print(
            "[yellow]note:[/] K is smaller than the gallery, so map@all and r_precision count relevant items beyond K "
            "as missed"
        )
    for category, means in report.per_category.items():
        out.print(f"  category {category}: " + ", ".join(f"{k}={v:.4f}" for k, v in means.items()))


@app.command("import-folder")
@reports_errors
def import_folder_cmd(
    root: Path = typer.Argument(..., help="Folder of class folders (nested allowed: one label per leaf folder)."),
    output: Path = typer.Argument(..., help="CSV to write."),
    validation_fraction: float = typer.Option(0.5, help="Share of the classes that go to validation."),
    seed: int = typer.Option(0, help="Seed of the class split and query choice."),
    queries_per_class: Optional[int] = typer.Option(
        None, help="Queries per validation class; default: every image is a query."
    ),
    labels: Optional[bool] = typer.Option(
        None,
        "--labels/--no-labels",
        help="One label per leaf folder, or a gallery without labels (id = path under ROOT); default: no labels for a "
        "flat folder, labels for a tree.",
    ),
) -> None:
    """Turn a class-per-folder image tree into a dataset table, split by class; a flat folder (or --no-labels) into a
    gallery table without labels, for `index`, `serve` and `search`."""
    from lookalike.data.folder import import_folder

    table = import_folder(root, validation_fraction, seed, queries_per_class, labels=labels)
    table.save(output)
    n = table.counts()
    if not table.has_labels:
        out.print(f"wrote {output}: {n['images']} images, no labels (a gallery table: index, serve and search use it)")
        return
    out.print(
        f"wrote {output}: {n['images']} images, {n['labels']} labels ({n['train']} train, {n['validation']} "
        f"validation: {n['queries']} queries, {n['gallery']} gallery)"
    )


@app.command()
@reports_errors
def convert(
    name: str = typer.Argument(
        ...,
        help="Published layout: sop, inshop, cub, cars, market1501, dukemtmc, street2shop, deepfashion2, sketchy, "
        "tu-berlin, tll, folder.",
    ),
    root: Path = typer.Argument(..., help="The dataset's folder, unpacked as published."),
    output: Path = typer.Argument(..., help="CSV to write: a dataset table (tll: a pairs table)."),
    check_images: bool = typer.Option(
        False, "--check-images", help="Also decode every image (slower); without it images are only checked to exist."
    ),
    class_split: Optional[Path] = typer.Option(
        None,
        help="sketchy, tu-berlin: file of the zero-shot test classes, one per line (the others train); in ICFRR's "
        "layout (png_ready/, file lists) the split to read: zs1 or zs2 (Sketchy; TU-Berlin's one split is read "
        "without it).",
    ),
    validation_fraction: Optional[float] = typer.Option(
        None, help="folder, tll: share of the classes (pairs) that go to validation."
    ),
    seed: Optional[int] = typer.Option(None, help="folder, tll: seed of the split."),
    queries_per_class: Optional[int] = typer.Option(
        None, help="folder: queries per validation class; default: every image."
    ),
) -> None:
    """Turn a public dataset in its published layout into a dataset table; missing or unreadable images are listed,
    nothing is written."""
    from lookalike.data.check import describe_problems
    from lookalike.data.convert import conversion_problems
    from lookalike.data.convert import convert as run_convert

    options = {
        "class_split": class_split,
        "validation_fraction": validation_fraction,
        "seed": seed,
        "queries_per_class": queries_per_class,
    }
    conversion = run_convert(name, root, **options)
    out.print(f"{name}: {conversion.summary()}", highlight=False)
    for note in conversion.notes:
        out.print(f"  note: {escape(printable(note))}", highlight=False)
    problems, n_checked = conversion_problems(conversion, decode=check_images)
    for line in describe_problems(problems, n_checked):
        err.print(f"[bold red]error:[/] {escape(printable(line))}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(2)
    conversion.table.save(output)
    out.print(
        f"wrote {output}" + ("" if check_images else " (images checked to exist; --check-images also decodes them)")
    )


@app.command()
@reports_errors
def extract(args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP)) -> None:
    """Embed the images of data.table with a timm model and save them to extract.output."""
    from lookalike.pipeline import run_extract, table_from_config

    cfg = _config(args)
    table = table_from_config(cfg)
    _debug(f"table {cfg.data.table}: {len(table)} rows")
    emb = run_extract(cfg, table, _progress("embedding", unit="image"))
    if emb is None:  # another rank of a multi-process run: rank 0 reports
        return
    out.print(f"wrote {cfg.extract.output}: {len(emb)} embeddings of dimension {emb.dim}")


@app.command()
@reports_errors
def search(
    args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP),
    index_dir: Optional[Path] = typer.Option(
        None, "--index", help="Search this index folder (`lookalike index`) with --image files instead of data.table."
    ),
    image: Optional[list[Path]] = typer.Option(None, "--image", help="With --index: a query image (repeat)."),
    k: int = typer.Option(10, "--k", min=1, help="With --index: results per query."),
    as_json: bool = typer.Option(False, "--json", help="With --index: one JSON object per query on stdout."),
    images_root: Optional[Path] = typer.Option(
        None, "--images-root", help="With --index: where the gallery images are now (default: the manifest's)."
    ),
) -> None:
    """Search the validation queries of data.table against its gallery and save RetrievalResults to search.output; or,
    with --index, print each --image's nearest gallery items: rank, id, path, label, distance, metadata."""
    if index_dir is not None:
        return _search_index(index_dir, image or [], k, as_json, images_root)
    from lookalike.pipeline import run_search, table_from_config

    cfg = _config(args)
    table = table_from_config(cfg)
    _debug(f"table {cfg.data.table}: {len(table)} rows")
    results = run_search(cfg, table, progress=_progress("searching", unit="query block"))
    out.print(
        f"wrote {cfg.search.output}: top-{results.k} of {results.n_queries} queries in {len(results.gallery_ids)} "
        "gallery items"
    )


def _search_index(
    folder: Path,
    images: list[Path],
    k: int,
    as_json: bool,
    images_root: Path | None,
    reranker: str | None = None,
    filter: str | None = None,
) -> None:
    """`lookalike query` and `lookalike search --index`: the top-k of each query image, as a table or as JSON lines."""
    from lookalike.serve import load_index

    if not images:
        raise LookalikeError("--image: expected at least one query image with --index")
    index = load_index(folder, images_root=images_root)
    try:
        for image in images:
            _print_hits(image, index.query(image, k, reranker, filter).reset_index(), as_json, len(index), filter)
    finally:
        index.close()


def _print_hits(image: Path, hits, as_json: bool, size: int, filter: str | None) -> None:
    """One query's hits (a DataFrame): a JSON line, or a table titled with the query and the gallery searched."""
    import json

    if as_json:
        print(json.dumps({"query": str(image), "results": hits.to_dict("records")}, ensure_ascii=False))
        return
    shown = f" passing {filter}" if filter else ""
    table = Table(title=f"{image}: top {len(hits)} of {size} gallery items{shown}")
    for column in hits.columns:
        table.add_column(str(column), justify="right" if column in ("rank", "distance") else "left")
    for row in hits.itertuples(index=False):
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else escape(printable(str(v))) for v in row))
    out.print(table)


@app.command()
@reports_errors
def evaluate(args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP)) -> None:
    """Compute CMC / precision / mAP of search results; write a JSON summary and pictures."""
    from lookalike.pipeline import run_evaluate, table_from_config

    cfg = _config(args)
    table = table_from_config(cfg)
    table.require_labels("evaluate")
    _debug(f"table {cfg.data.table}: {len(table)} rows")
    evaluation = run_evaluate(cfg, table)
    _debug(
        f"scored {evaluation.report.n_queries} queries, wrote {cfg.evaluate.output} and {len(evaluation.pictures)} "
        "pictures"
    )
    _print_report(evaluation.report)
    out.print(f"wrote {cfg.evaluate.output}" + "".join(f", {p}" for p in evaluation.pictures))
    if cfg.rerank:
        _print_stages(cfg, table)


def _print_stages(cfg, table) -> None:
    from lookalike.pipeline import run_rerank
    from lookalike.rerank.chain import stage_reports

    stages = run_rerank(cfg, table, grids=True)
    _print_comparison(
        {key: r.means for key, r in stage_reports(stages).items()}, "metrics before and after each re-ranking stage"
    )
    out.print(f"wrote {cfg.search.reranked_output}")


@app.command()
@reports_errors
def rerank(args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP)) -> None:
    """Re-rank search.output with the chain in `rerank` (centroids, icfrr, kreciprocal, qe, dba, pairwise); metrics
    after each stage."""
    from lookalike.pipeline import table_from_config

    cfg = _config(args)
    table = table_from_config(cfg)
    table.require_labels("rerank")
    _print_stages(cfg, table)


@app.command()
@reports_errors
def icfrr(
    cache: Optional[Path] = typer.Argument(
        None,
        help="An ICFRR cache folder: qg_dists.pth, gg_dists.pth, optional labels.pth (or give --cache-root and "
        "--dataset).",
    ),
    cache_root: Optional[Path] = typer.Option(
        None, "--cache-root", "--cache_root", help="The reference's layout: the cache is CACHE_ROOT/DATASET/PER_CLASS."
    ),
    dataset: Optional[str] = typer.Option(
        None,
        "--dataset",
        help="The reference's dataset name (tuberlin, sketchy_zs1, sketchy_zs2, custom) under --cache-root.",
    ),
    per_class: int = typer.Option(
        -1, "--per-class", "--per_class", help="The reference's images per class of the cache (-1: all)."
    ),
    kg: int = typer.Option(256, "--kg", "--KG", help="Gallery-gallery list length KG."),
    kq: int = typer.Option(250, "--kq", "--KQ", help="Voters per query KQ."),
    beta: float = typer.Option(0.5, help="Weight of the votes."),
    n_times: int = typer.Option(5, "--n-times", "--n_times", help="Iterations."),
    output: Path = typer.Option(
        Path("runs/icfrr"),
        "--output",
        "--rerank-results-dir",
        "--rerank_results_dir",
        help="Folder for ranks/, rankings.npz, metrics.json, the plot and vis/ (with --dataset: "
        "OUTPUT/DATASET/PER_CLASS).",
    ),
    query_idxs_to_vis: Optional[list[str]] = typer.Option(
        None,
        "--query-idxs-to-vis",
        "--query_idxs_to_vis",
        help="Queries (cache rows) to draw after every iteration: repeat the option or separate by commas.",
    ),
    num_gallery_ims_to_vis: int = typer.Option(
        20, "--num-gallery-ims-to-vis", "--num_gallery_ims_to_vis", help="Gallery images per drawn query."
    ),
    image_root: Optional[Path] = typer.Option(
        None,
        "--image-root",
        help="With --query-idxs-to-vis: the folder holding query/ and gallery/ (custom; labels.json gives the order), "
        "or with --dataset sketchy_zs1|sketchy_zs2|tuberlin the dataset folder with its zero-shot file lists.",
    ),
) -> None:
    """ICFRR on a reference cache, exactly as the reference computes it: the ranking after every iteration, metrics and
    their plot when there are labels, rank strips of chosen queries."""
    import json

    from lookalike.core.atomic import write_text_atomic
    from lookalike.rerank import plot_icfrr_curve, run_icfrr_cache
    from lookalike.rerank.icfrr import RANKINGS_NPZ, RANKS_DIR, VIS_DIR, cache_folder, load_icfrr_cache

    if (cache is None) == (cache_root is None and dataset is None):
        raise LookalikeError(
            "icfrr: give a cache folder, or --cache-root and --dataset (the reference's CACHE_ROOT/DATASET/PER_CLASS), "
            "not both"
        )
    if cache is None:
        cache = cache_folder(cache_root or Path("cache"), dataset or "tuberlin", per_class)
        output = cache_folder(output, dataset or "tuberlin", per_class)
    strips = _rank_strips(
        cache, query_idxs_to_vis, num_gallery_ims_to_vis, image_root, load_icfrr_cache, dataset, per_class
    )
    records = run_icfrr_cache(cache, kg=kg, kq=kq, beta=beta, n_times=n_times, output=output, strips=strips)
    written = [output / RANKS_DIR, output / RANKINGS_NPZ] + ([output / VIS_DIR] if strips else [])
    if len(records[0]) == 1:
        out.print(f"{cache}: no labels (labels.pth missing or all -1), so no metrics; ran {n_times} iterations")
        out.print("wrote " + ", ".join(map(str, written)))
        return
    table = Table(title=f"ICFRR KG={kg} KQ={kq} beta={beta}")
    for key in records[0]:
        table.add_column(key, justify="right")
    for r in records:
        table.add_row(str(r["iteration"]), *(f"{v:.4f}" for k, v in r.items() if k != "iteration"))
    out.print(table)
    write_text_atomic(output / "metrics.json", json.dumps(records, indent=2) + "\n")
    plot = plot_icfrr_curve(records, output / "icfrr_curve.png")
    out.print("wrote " + ", ".join(map(str, [output / "metrics.json", plot, *written])))


def _rank_strips(
    cache: Path,
    queries: Optional[list[str]],
    top_k: int,
    image_root: Optional[Path],
    load_cache,
    dataset: Optional[str] = None,
    per_class: int = -1,
):
    """The rank strips `lookalike icfrr` draws (None without --query-idxs-to-vis): chosen rows, images from
    image_root."""
    from lookalike.rerank.icfrr import RankStrips, reference_image_ids

    if not queries:
        return None
    rows = []
    for part in ",".join(queries).split(","):
        if not part.strip().lstrip("-").isdigit():
            raise LookalikeError(f"--query-idxs-to-vis: expected query numbers (cache rows), got {part!r}")
        rows.append(int(part))
    if image_root is None:
        raise LookalikeError(
            "--query-idxs-to-vis: needs --image-root, the folder holding the query/ and gallery/ images"
        )
    qg = load_cache(cache)[0]
    query_ids, gallery_ids = reference_image_ids(image_root, *qg.shape, dataset, per_class)
    return RankStrips(image_root, query_ids, gallery_ids, rows, top_k)


class _BuildByDefault(TyperGroup):
    """`lookalike index CONFIG key=value ...` (no sub-command named) runs `lookalike index build CONFIG ...`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """Put `build` in front unless the first word names a sub-command or asks for help."""
        if not args or (args[0] not in self.commands and args[0] != "--help"):
            args = ["build", *args]
        return super().parse_args(ctx, args)


index_app = typer.Typer(
    cls=_BuildByDefault,
    help="Build a served gallery folder (`lookalike index CONFIG`, i.e. `index build`), or update one in place "
    "(`index add`, `index remove`) without re-embedding the gallery.",
)
app.add_typer(index_app, name="index")


@index_app.command("build")
@reports_errors
def index_build(
    args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP),
    export: Optional[Path] = typer.Option(
        None,
        "--export",
        help="Copy this existing index folder into Milvus (index.uri, index.collection); no embedding.",
    ),
) -> None:
    """Embed the gallery (serve.gallery rows of data.table) and write serve.index_dir for `lookalike serve`; with
    index.backend=milvus the vectors (with path, label and metadata) go into a Milvus collection the folder names.
    `lookalike index CONFIG ...` is this command."""
    from lookalike.extract_shards import launch_rank
    from lookalike.pipeline import extractor_from_config, table_from_config
    from lookalike.serve import build_index, load_index

    cfg = _config(args)
    if export is not None:
        return _export_to_milvus(export, cfg)
    progress = _progress("embedding the gallery", unit="image")
    folder = build_index(cfg, table_from_config(cfg), extractor_from_config(cfg), progress)
    if launch_rank() != 0:  # another rank of a multi-process run: rank 0 wrote the index and reports
        return
    built = load_index(folder)
    out.print(
        f"wrote {folder}: {len(built)} gallery images, {built.manifest.model.name}, {cfg.search.index} search, "
        f"re-rankers: {', '.join(built.rerankers) or 'none'}"
    )
    if built.milvus is not None:
        out.print(f"vectors in Milvus {built.manifest.uri}, collection {built.manifest.collection}: {len(built)} items")
    out.print(f"serve it with: lookalike serve {folder}")


@index_app.command("add")
@reports_errors
def index_add(
    index_dir: Path = typer.Argument(..., help="A folder written by `lookalike index`."),
    source: list[Path] = typer.Argument(
        ..., help="What to add: a class-per-folder tree, a dataset CSV (every row), or image files."
    ),
) -> None:
    """Embed only SOURCE's images with the folder's own model and add them to its gallery (an id already there is
    replaced: ids are image paths, or a table's id column); atomic, and a running `lookalike serve` switches to it."""
    from lookalike.serve.update import add_items, embed_new, read_source

    items = embed_new(index_dir, read_source(source), _progress("embedding the new images", unit="batch"))
    report = add_items(index_dir, items)
    out.print(
        f"updated {index_dir}: {report.added} added, {report.replaced} replaced; {report.size} gallery images "
        f"(generation {report.generation})",
        highlight=False,
    )


@index_app.command("remove")
@reports_errors
def index_remove(
    index_dir: Path = typer.Argument(..., help="A folder written by `lookalike index`."),
    ids: list[str] = typer.Argument(..., help="Ids of the items to remove (their image paths, or a table's id)."),
) -> None:
    """Remove gallery items by id without rebuilding; an unknown id is an error and nothing changes."""
    from lookalike.serve.update import remove_items

    report = remove_items(index_dir, ids)
    out.print(
        f"updated {index_dir}: {report.removed} removed; {report.size} gallery images (generation {report.generation})",
        highlight=False,
    )


def _export_to_milvus(folder: Path, cfg) -> None:
    """Copy an index folder's vectors, paths and labels into cfg.index's Milvus collection and say so."""
    from lookalike.serve.milvus_export import export_index_to_milvus

    index = cfg.index
    store = export_index_to_milvus(
        folder, index.uri, index.collection, index.type, progress=_progress("writing to Milvus")
    )
    out.print(f"exported {folder} into Milvus {index.uri}, collection {index.collection}: {store.count()} vectors")


@app.command()
@reports_errors
def serve(
    index_dir: Path = typer.Argument(..., help="A folder written by `lookalike index`."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="TCP port."),
    allow_host: Optional[list[str]] = typer.Option(
        None,
        "--allow-host",
        help="Host header name to answer besides loopback names and --host (repeat; also serve.allowed_hosts).",
    ),
    runtime: Optional[str] = typer.Option(
        None,
        "--runtime",
        help="Embed queries with torch (model.pt) or onnx (model.onnx in onnxruntime); default: serve.runtime.",
    ),
    admin_token: Optional[str] = typer.Option(
        None,
        "--admin-token",
        envvar="LOOKALIKE_ADMIN_TOKEN",
        help="Enable POST /items and DELETE /items/{id} for requests with `Authorization: Bearer TOKEN` (prefer the "
        "environment variable: a command line is visible to other users). Without it those routes do not exist.",
    ),
    images_root: Optional[Path] = typer.Option(
        None,
        "--images-root",
        help="Where the gallery images are now (a moved collection); default: the images root in the manifest.",
    ),
) -> None:
    """Search the gallery of INDEX_DIR in the browser: upload or pick a query, compare re-rankers side by side."""
    import uvicorn

    from lookalike.serve import load_index
    from lookalike.serve.app import create_app, server_config

    index = load_index(index_dir, runtime, images_root)
    app_ = create_app(index, host, allow_host or [], admin_token or None)
    writes = "; POST /items and DELETE /items/{id} with the admin token" if admin_token else ""
    out.print(
        f"lookalike: serving {index_dir} on http://{host}:{port}/ ({index.runtime}; API schema at "
        f"/openapi.json{writes})"
    )
    uvicorn.Server(server_config(app_, index, host, port)).run()


@app.command()
@reports_errors
def query(
    index_dir: Path = typer.Argument(..., help="A folder written by `lookalike index`."),
    image: list[Path] = typer.Argument(..., help="Query image files (not gallery items)."),
    k: int = typer.Option(10, "--k", min=1, help="How many gallery items to list per image."),
    reranker: Optional[str] = typer.Option(None, "--reranker", help="One of the index's re-rankers (column name)."),
    filter: Optional[str] = typer.Option(
        None,
        "--filter",
        help="Milvus filter on the gallery's fields and metadata, e.g. 'alphabet == \"Greek\"' (index.backend=milvus).",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per query image on stdout."),
    images_root: Optional[Path] = typer.Option(
        None, "--images-root", help="Where the gallery images are now (default: the manifest's)."
    ),
) -> None:
    """List the K gallery items of INDEX_DIR nearest to each IMAGE: rank, id, path, label, distance, metadata."""
    _search_index(index_dir, image, k, as_json, images_root, reranker, filter)


@app.command()
@reports_errors
def export(
    weights: Path = typer.Argument(..., help="An extractor checkpoint (model.weights) or a pairwise checkpoint."),
    args: Optional[list[str]] = typer.Argument(
        None, help="key=value overrides for the extractor's model.* and data.* (e.g. model.name=resnet18)."
    ),
    format: str = typer.Option("onnx", "--format", help="The export format (onnx)."),
    output: Optional[Path] = typer.Option(None, "--output", help="The file to write (default: WEIGHTS with .onnx)."),
    kind: str = typer.Option("extractor", "--kind", help="extractor (images -> embeddings) or pairwise (image pairs)."),
) -> None:
    """Export WEIGHTS as ONNX (dynamic batch) with its preprocessing beside it, to embed or re-rank without torch."""
    if format != "onnx":
        raise LookalikeError(f"--format: expected onnx, got {format!r}")
    from lookalike.export import export_weights  # torch and onnx: after the quick checks

    cfg = _config([*(args or []), f"model.weights={weights}"]) if kind == "extractor" else None
    model, sidecar = export_weights(weights, output or weights.with_suffix(".onnx"), kind, cfg)
    out.print(f"wrote {model} ({kind}, ONNX) and {sidecar} (its preprocessing)")


def _print_comparison(columns: dict[str, dict[str, float]], title: str) -> None:
    """Metrics side by side, one column per stage (e.g. before / after training)."""
    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    first = next((c for c in columns.values() if c), {})
    for metric in first:
        table.add_row(metric, *(f"{c[metric]:.4f}" if metric in c else "-" for c in columns.values()))
    out.print(table)


@app.command()
@reports_errors
def train(
    args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue from a checkpoint: its path, or 'last' (train.output/checkpoints/last.ckpt)."
    ),
) -> None:
    """Train an extractor with metric losses (Lightning): checkpoints, logs and validation pictures under
    train.output."""
    from lookalike.models.extractor import model_name
    from lookalike.train import run_train

    _quiet_lightning()
    cfg = _config(args)
    _require_labels(cfg, "train")
    if cfg.train.runs != 1:
        _train_repeated(cfg, resume)
        return
    result = run_train(cfg, resume)
    if not result.is_global_zero:
        return
    _print_comparison(
        {"before": result.metrics_before, "after": result.metrics},
        f"validation ({model_name(cfg.model.name, cfg.model.weights)})",
    )
    out.print(f"training speed: {result.images_per_second:.1f} images/s")
    out.print(
        f"best checkpoint: {result.best_checkpoint}\nlast checkpoint: {result.last_checkpoint}\nlogs: {result.log_dir}"
    )


def _require_labels(cfg, command: str) -> None:
    """One line when data.table is a gallery table without labels (training and validation need labels)."""
    from lookalike.pipeline import table_from_config

    if cfg.data.table:
        table_from_config(cfg).require_labels(command)


def _train_repeated(cfg, resume: str | None) -> None:
    """train.runs trainings with consecutive seeds: final metrics per run and their mean ± std."""
    from lookalike.models.extractor import model_name
    from lookalike.train import run_train_repeated

    if resume is not None:
        raise LookalikeError(
            f"--resume: continues one run; with train.runs={cfg.train.runs} resume a run alone (train.output=.../runN "
            "train.runs=1)"
        )
    result = run_train_repeated(cfg)
    if not result.runs[-1].is_global_zero:
        return
    table = Table(
        title=f"validation ({model_name(cfg.model.name, cfg.model.weights)}), mean ± std over {len(result.runs)} runs "
        "(seeds "
        f"{', '.join(map(str, result.seeds))})"
    )
    for name in ("metric", "mean ± std", *(f"seed {s}" for s in result.seeds)):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for metric, cell in result.summary.items():
        table.add_row(
            metric, f"{cell['mean']:.4f} ± {cell['std']:.4f}", *(f"{r.metrics[metric]:.4f}" for r in result.runs)
        )
    out.print(table)
    out.print(f"wrote {result.path}; runs under {cfg.train.output}/run0 ... run{len(result.runs) - 1}")


@app.command("tune-rerank")
@reports_errors
def tune_rerank(
    args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP),
    output: Path = typer.Option(
        Path("runs/rerank_tuned.yaml"), "--output", "-o", help="Where to write the chosen chain (`rerank: [...]`)."
    ),
    chains: bool = typer.Option(True, "--chains/--no-chains", help="Also try chains of two re-rankers."),
) -> None:
    """Choose a re-ranking chain on the training split (every image a query against the others; the validation split
    is never read while choosing): a table of every candidate, the best written as a config snippet, then its
    metrics on the validation split."""
    from lookalike.tune import candidate_steps, tune_rerank, validate_choice, write_snippet

    cfg = _config(args)
    tuning = tune_rerank(
        cfg,
        steps=candidate_steps(chains=chains),
        progress=_progress("tuning", "chain"),
        embed_progress=_progress("embedding"),
    )
    table = Table(title="re-ranking candidates on the training split")
    for column in ("candidate", "CMC@1", "mAP@all", "time (s)"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for c in tuning.candidates:
        style = "bold" if c is tuning.best else None
        table.add_row(escape(c.label), f"{c.cmc1:.4f}", f"{c.map_all:.4f}", f"{c.seconds:.2f}", style=style)
    out.print(table)
    write_snippet(tuning.best, output)
    out.print(f"wrote {output}: rerank: {escape(tuning.best.label)}")
    before, after = validate_choice(cfg, tuning.best.steps, progress=_progress("embedding"))
    out.print(
        f"validation split: CMC@1 {before.cmc1:.4f} -> {after.cmc1:.4f}, mAP@all {before.map_all:.4f} -> "
        f"{after.map_all:.4f} with rerank: {escape(tuning.best.label)}"
    )


@app.command()
@reports_errors
def validate(
    args: Optional[list[str]] = typer.Argument(
        None, help=ARGS_HELP + " `weights=PATH` is short for model.weights=PATH."
    ),
) -> None:
    """Evaluate a trained checkpoint on the validation split, exactly as training validates; with `rerank`, each stage
    too."""
    from lookalike.train import run_validate

    _quiet_lightning()
    args = [f"model.{a}" if a.startswith("weights=") else a for a in args or []]
    cfg = _config(args)
    _require_labels(cfg, "validate")
    if not cfg.model.weights:
        raise LookalikeError(
            "model.weights: expected the checkpoint to evaluate, e.g. weights=runs/train/checkpoints/last.ckpt"
        )
    if cfg.rerank:  # the extractor's lists, then each re-ranking stage (e.g. rerank=[{pairwise: {weights: PATH}}])
        from lookalike.pipeline import rerank_validation
        from lookalike.rerank.chain import stage_reports

        stages = rerank_validation(cfg, _progress("embedding"))
        _print_comparison(
            {key: r.means for key, r in stage_reports(stages).items()},
            "validation before and after each re-ranking stage",
        )
        out.print(f"wrote {cfg.train.output}/validation/metrics_rerank.json and grid_rerank_*.png")
        return
    metrics = run_validate(cfg)
    _print_comparison({cfg.model.weights: metrics}, "validation")
    out.print(f"wrote {cfg.train.output}/validation/metrics_validate.json")


@app.command("train-reranker")
@reports_errors
def train_reranker(
    args: Optional[list[str]] = typer.Argument(
        None, help=ARGS_HELP + " `extractor_weights=PATH` is short for model.weights=PATH."
    ),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue from a checkpoint: its path, or 'last' (train.output/checkpoints/last.ckpt)."
    ),
) -> None:
    """Train the STIR pairwise re-ranker (pairwise.*) on pairs mined with the frozen extractor (model.*); validation
    re-ranks the top_n."""
    from lookalike.models.extractor import model_name
    from lookalike.train.pairwise import run_train_reranker

    _quiet_lightning()
    args = [f"model.weights={a.split('=', 1)[1]}" if a.startswith("extractor_weights=") else a for a in args or []]
    cfg = _config(args)
    _require_labels(cfg, "train-reranker")
    result = run_train_reranker(cfg, resume, _progress("embedding"))
    if not result.is_global_zero:
        return
    columns = {"extractor": result.metrics_before, f"re-ranked top {cfg.pairwise.top_n}": result.metrics}
    _print_comparison(
        columns, f"validation ({cfg.pairwise.name} re-ranking {model_name(cfg.model.name, cfg.model.weights)})"
    )
    out.print(f"training speed: {result.images_per_second:.1f} images/s")
    out.print(
        f"best checkpoint: {result.best_checkpoint}\nlast checkpoint: {result.last_checkpoint}\nlogs: {result.log_dir}"
    )


@app.command("extract-pairs")
@reports_errors
def extract_pairs(args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP)) -> None:
    """Features of both images of every pair in adapt.pairs (adapt.backbones at their layers), with a PCA fitted on the
    train pairs; saved to adapt.features."""
    from lookalike.adapt import extract_from_config, pairs_from_config

    cfg = _config(args)
    features = extract_from_config(cfg, pairs_from_config(cfg), _progress("extracting"))
    mirrors = " (and of their mirror images)" if features.has_flip else ""
    pca = (
        f"; PCA to {features.pca.dim} dimensions fitted on the {int((features.split == 'train').sum())} train pairs"
        if features.pca
        else ""
    )
    out.print(f"wrote {cfg.adapt.features}: {len(features)} pairs, {features.dim} features per image{mirrors}{pca}")


@app.command()
@reports_errors
def adapt(args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP)) -> None:
    """Learn an adaptation module on frozen features of image pairs over adapt.runs random splits; print top-k accuracy
    of raw vs adapted features on the test pairs. adapt.protocol=reference runs the published command (PCA on all
    pairs, 150 epochs, 1 run, 25 % test, last epoch)."""
    from lookalike.adapt import DIRECTIONS, run_adapt
    from lookalike.adapt.run import protocol_config, protocol_summary

    cfg = protocol_config(_config(args))
    out.print(protocol_summary(cfg))
    result = run_adapt(cfg, _progress("extracting"), _progress("runs", unit="run"))
    a, summary = cfg.adapt, result.summary()
    table = Table(
        title=f"test top-k accuracy, mean ± std over {len(result.runs)} runs ({result.n_pairs} pairs, {result.dim} "
        "features)"
    )
    for name in ("k", "direction", "raw features", f"adapted ({a.module})"):
        table.add_column(name, justify="right" if name != "direction" else "left")
    for k in a.top_k:
        for direction, label in DIRECTIONS.items():
            cells = (summary[kind][f"top{k}/{direction}"] for kind in ("raw", "adapted"))
            table.add_row(str(k), label, *(f"{c['mean']:.4f} ± {c['std']:.4f}" for c in cells))
    out.print(table)
    kept = ", ".join(str(r.best_epoch) for r in result.runs)
    if a.protocol == "reference":
        out.print(
            f"epoch reported: the last ({kept}), as the reference's train.py; test curves per epoch in TensorBoard"
        )
    else:
        out.print(f"epochs kept (best {a.monitor} on validation pairs): {kept}")
    out.print(f"features: {'reused ' if result.features_reused else 'extracted to '}{result.features}")
    out.print(
        f"wrote {result.output / 'metrics.json'}; TensorBoard curves per run and averaged: "
        f"{result.output / 'tensorboard'}"
    )


@app.command()
@reports_errors
def demo(
    images: Optional[Path] = typer.Option(
        None, help="A class-per-folder image tree; default: the bundled Omniglot subset."
    ),
    dataset: str = typer.Option(
        "omniglot", help="omniglot (bundled, 136 characters) or digits (scikit-learn's 8x8 digits)."
    ),
    out_dir: Path = typer.Option(
        Path("runs/demo"), "--out", help="Where the table, embeddings, results, metrics and pictures go."
    ),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="key=value overrides of the demo config (e.g. model.name=resnet34)."
    ),
    rerank: bool = typer.Option(
        True, "--rerank/--no-rerank", help="After training, re-rank with k-reciprocal and a briefly trained STIR model."
    ),
    pairwise: Optional[list[str]] = typer.Option(
        None, "--pairwise", help="key=value override of the STIR training (e.g. train.epochs=1)."
    ),
) -> None:
    """Run the whole pipeline on an embedded dataset: import, evaluate untrained, train, evaluate again, re-rank, draw;
    one line per stage gives its gain."""
    from lookalike.demo import run_demo

    _quiet_lightning()
    started = time.perf_counter()
    run = run_demo(
        out_dir,
        images,
        tuple(overrides or ()),
        progress=_progress("embedding"),
        rerank=rerank,
        dataset=dataset,
        pairwise_overrides=tuple(pairwise or ()),
    )
    if run.training is None:
        _print_report(run.evaluation.report, f"demo ({run.config.model.name}, untrained)")
    else:
        columns = {
            "untrained": run.untrained.means,
            f"trained ({run.config.train.epochs} epochs)": run.evaluation.report.means,
        }
        columns |= {g.name: s.report.means for g, s in zip(run.gains[1:], run.stages[1:])}
        _print_comparison(
            columns, f"demo: {run.config.model.name} on {run.evaluation.report.n_queries} validation queries"
        )
        out.print(
            f"training speed: {run.training.images_per_second:.1f} images/s; checkpoint: {run.config.model.weights}"
        )
    if run.reranking is not None:
        out.print(f"re-ranker checkpoint: {run.reranking.last_checkpoint}")
    for gain in run.gains:
        out.print(gain.line(), highlight=False, soft_wrap=True)
    out.print(f"table: {run.table_path}\nmetrics: {run.config.evaluate.output}")
    for picture in run.evaluation.pictures:
        out.print(f"picture: {picture}")
    out.print(f"demo time: {time.perf_counter() - started:.0f} s")


# ---- setting up: `lookalike data ...`, `lookalike config show`, and where every --help says config keys are documented
# ----

CONFIG_DOCS_EPILOG = (
    "Config keys, with their defaults and meanings: docs/config.md in the repository; "
    "`lookalike config show CONFIG key=value ...` prints a resolved config (both optional)."
)
data_app = typer.Typer(help="Prepare the datasets the example configs use.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")


@data_app.command("omniglot")
@reports_errors
def data_omniglot(
    target: Path = typer.Argument(
        Path("data/omniglot"), help="Folder to unpack into; the Omniglot configs read data/omniglot."
    ),
    validation_fraction: float = typer.Option(0.3, help="Share of the characters that go to validation."),
    seed: int = typer.Option(0, help="Seed of the character split."),
) -> None:
    """Unpack the bundled Omniglot subset and write omniglot.csv (dataset table) and pairs.csv (drawer pairs)
    beside it."""
    from lookalike.data.bundled import prepare_omniglot

    prepared = prepare_omniglot(target, validation_fraction, seed)
    n = prepared.table.counts()
    out.print(f"images: {prepared.images} ({n['images']} images, {n['labels']} characters)", highlight=False)
    out.print(f"wrote {prepared.table_path}: {n['train']} train, {n['validation']} validation", highlight=False)
    out.print(f"wrote {prepared.pairs_path}: {len(prepared.pairs)} pairs", highlight=False)


@config_app.command("show")
@reports_errors
def config_show(
    args: Optional[list[str]] = typer.Argument(None, help=ARGS_HELP + " Without them: the defaults."),
) -> None:
    """Print the resolved config (file, then overrides, over every default) as YAML that loads back to the same
    config."""
    from lookalike.config_doc import config_yaml

    typer.echo(config_yaml(_config(args)), nl=False)


def _with_config_docs(epilog: str | None) -> str:
    """A command's own epilog (if any) followed by CONFIG_DOCS_EPILOG, once."""
    if epilog and CONFIG_DOCS_EPILOG in epilog:
        return epilog
    return f"{epilog}\n\n{CONFIG_DOCS_EPILOG}" if epilog else CONFIG_DOCS_EPILOG


def _add_config_epilog(typer_app: typer.Typer) -> None:
    """End the --help of the app, of every command and of every command group with CONFIG_DOCS_EPILOG."""
    typer_app.info.epilog = _with_config_docs(typer_app.info.epilog)
    for command in typer_app.registered_commands:
        command.epilog = _with_config_docs(command.epilog)
    for group in typer_app.registered_groups:
        _add_config_epilog(group.typer_instance)


def main() -> None:
    """The command line; SIGTERM (`kill PID`) stops any command in one line with exit code 143, training after saving
    last.ckpt for --resume last."""
    from lookalike.signals import EXIT_CODE, Terminated, stop_on_sigterm

    _add_config_epilog(app)
    stop_on_sigterm()
    try:
        app()
    except Terminated as exc:
        resume = "; continue with --resume last" if exc.saved else ""
        err.print(f"[yellow]{escape(printable(str(exc)))}{resume}[/]", highlight=False, soft_wrap=True)
        sys.exit(EXIT_CODE)


if __name__ == "__main__":
    main()
