"""The retrieval pipeline as steps over the config: extract, search, evaluate (used by the CLI and the demo)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from lookalike.config import Config
from lookalike.core.atomic import write_text_atomic
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import ConfigError, LookalikeWarning
from lookalike.core.protocol import exclusion_groups, query_gallery_ids
from lookalike.core.results import RetrievalResults, visible_counts
from lookalike.core.table import DatasetTable, load_table
from lookalike.data.check import skip_bad_images
from lookalike.data.images import transforms_for
from lookalike.extract import Progress, extract_embeddings
from lookalike.extract_shards import embed_to_file
from lookalike.metrics import MetricsReport, cmc_curve, evaluate_table
from lookalike.models.extractor import Extractor
from lookalike.provenance import KEY, check_input, record, with_record
from lookalike.rerank import RerankContext, Stage, build_chain, run_chain
from lookalike.rerank.chain import stage_reports, uses_embeddings
from lookalike.search import search_table, search_table_shards
from lookalike.shards import complete_shards, shard_folder
from lookalike.viz import SCORE_RERANKERS, save_cmc_curve, save_result_grid, spread_queries, table_labels

WHOLE_RANKING_LIMIT = 2**26  # most query x gallery entries validation ranks in full (indices + distances: 768 MiB)


def table_from_config(cfg: Config) -> DatasetTable:
    """Load the dataset table named by data.table (relative paths resolved from data.root); data.skip_bad_images drops
    bad rows."""
    if not cfg.data.table:
        raise ConfigError("data.table: expected the path of a dataset CSV, e.g. data.table=dataset.csv")
    if cfg.data.skip_bad_images:
        return skip_bad_images(load_table(cfg.data.table, cfg.data.root, check_files=False))
    return load_table(cfg.data.table, cfg.data.root)


def extractor_from_config(cfg: Config) -> Extractor:
    """Create the timm extractor and load model.weights when given."""
    return Extractor.from_config(cfg)


def run_extract(cfg: Config, table: DatasetTable, progress: Progress | None = None) -> Embeddings | None:
    """Embed the rows of extract.split (or all rows) and save them to extract.output, shard by shard (resumable, on one
    device or many: see lookalike.extract_shards); the embeddings, or None on a rank other than 0 of a multi-process
    run."""
    rows = table.split(cfg.extract.split) if cfg.extract.split else table
    extractor = extractor_from_config(cfg)
    meta = with_record({"model": extractor.name, "normalized": extractor.normalize}, cfg)
    transform = transforms_for(extractor, cfg.data)
    if not embed_to_file(cfg, extractor, rows, transform, cfg.extract.output, meta, progress):
        return None
    return Embeddings.load(cfg.extract.output)


def load_embeddings(cfg: Config, command: str) -> Embeddings:
    """search.embeddings (default extract.output), refused when made from another table or model than `cfg` names."""
    path = cfg.search.embeddings or cfg.extract.output
    emb = Embeddings.load(path)
    check_input(emb.meta, path, cfg, command, "extract")
    return emb


def load_results(cfg: Config, command: str) -> RetrievalResults:
    """evaluate.results (default search.output), refused when made from another table or model than `cfg` names."""
    path = cfg.evaluate.results or cfg.search.output
    results = RetrievalResults.load(path)
    check_input(results.meta, path, cfg, command, "search")
    return results


def embed_table(cfg: Config, extractor: Extractor, table: DatasetTable, progress: Progress | None = None) -> Embeddings:
    """Every row of `table` embedded by the extractor with its evaluation transform, on extract.device, in the batches
    (data.batch_size) and memory layout (trainer.channels_last) of training's validation: the same checkpoint gives the
    same embeddings, to the bit, and so the same metrics."""
    d = cfg.data
    return extract_embeddings(
        extractor,
        table,
        transforms_for(extractor, d),
        d.batch_size,
        d.num_workers,
        cfg.extract.device,
        progress,
        cfg.trainer.channels_last,
    )


def run_search(
    cfg: Config, table: DatasetTable, embeddings: Embeddings | None = None, progress: Progress | None = None
) -> RetrievalResults:
    """Search the table's validation queries against its gallery and save the results to search.output. With a FAISS
    search.index and the shards of extract.output kept (extract.keep_shards), the index is built from the shards and no
    array of every vector is loaded."""
    s = cfg.search
    shards = shard_folder(cfg.extract.output)
    if embeddings is None and s.embeddings is None and s.index != "exact" and complete_shards(shards):
        check_input(Embeddings.read_meta(cfg.extract.output), cfg.extract.output, cfg, "search", "extract")
        results = search_table_shards(shards, table, s.k, s.metric, s.index)  # memory ~ the index, not the vectors
    else:
        emb = embeddings if embeddings is not None else load_embeddings(cfg, "search")
        if embeddings is not None and KEY in emb.meta:
            check_input(emb.meta, "the embeddings", cfg, "search", "extract")
        results = search_table(emb, table, s.k, metric=s.metric, index=s.index, device=s.device, progress=progress)
    results = RetrievalResults(
        results.indices, results.distances, results.query_ids, results.gallery_ids, with_record(results.meta, cfg)
    )
    results.save(s.output)
    return results


def search_and_score(
    cfg: Config, embeddings: Embeddings, table: DatasetTable
) -> tuple[MetricsReport, RetrievalResults]:
    """Search the validation queries against the gallery images, or their per-label centroids (evaluate.centroids), and
    score."""
    s, e = cfg.search, cfg.evaluate
    ks = e.metric_kwargs()
    if e.centroids != "none":
        from lookalike.search.centroids import evaluate_centroids

        results, report = evaluate_centroids(
            embeddings, table, s.k, per_sequence=e.centroids == "label_sequence", metric=s.metric, **ks
        )
        return report, results
    results = search_table(embeddings, table, validation_k(s.k, table), metric=s.metric, index=s.index, device=s.device)
    return evaluate_table(results, table, **ks), results


def validation_k(k: int, table: DatasetTable) -> int:
    """The list length validation searches: every gallery item a query may see when queries x gallery is at most
    WHOLE_RANKING_LIMIT, so that map@all and r_precision count every relevant item; else `k` (search.k), with a
    LookalikeWarning that those two count relevant items beyond it as missed (the report's complete_ranking is
    false)."""
    query_ids, gallery_ids = query_gallery_ids(table)
    whole = int(
        visible_counts(len(gallery_ids), len(query_ids), exclusion_groups(table, query_ids, gallery_ids)).max(initial=0)
    )
    if len(query_ids) * whole <= WHOLE_RANKING_LIMIT or k >= whole:
        return max(whole, 1)
    warnings.warn(
        LookalikeWarning(
            f"validation ranks the top {k} of {whole} gallery items ({len(query_ids)} queries x {whole} is more "
            f"than {WHOLE_RANKING_LIMIT} entries): map@all and r_precision count relevant items beyond {k} as missed"
        ),
        stacklevel=3,
    )
    return k


@dataclass
class Evaluation:
    report: MetricsReport
    pictures: list[Path]


def run_evaluate(cfg: Config, table: DatasetTable, results: RetrievalResults | None = None) -> Evaluation:
    """Compute metrics (against gallery images, or per-label centroids of the embeddings), write the JSON and
    pictures."""
    e = cfg.evaluate
    if e.centroids != "none":
        report, results = search_and_score(cfg, load_embeddings(cfg, "evaluate"), table)
    else:
        if results is not None and KEY in results.meta:
            check_input(results.meta, "the results", cfg, "evaluate", "search")
        results = results if results is not None else load_results(cfg, "evaluate")
        report = evaluate_table(results, table, **e.metric_kwargs())
    report.save(e.output, record(cfg))
    pictures = []
    if e.grid and e.centroids == "none":  # centroids are not images: no grid for them
        queries = spread_queries(results.n_queries, e.grid_queries)
        labels = table_labels(table, results)
        pictures.append(
            save_result_grid(results, e.grid, table.root, report.relevance, queries, e.grid_top_k, labels=labels)
        )
    if e.cmc_plot:
        pictures.append(save_cmc_curve({"CMC": cmc_curve(report.relevance, report.n_relevant)}, e.cmc_plot))
    return Evaluation(report, pictures)


def rerank_context(
    cfg: Config, table: DatasetTable, results: RetrievalResults, embeddings: Embeddings | None
) -> RerankContext:
    """What the chain needs: the results' query and gallery embeddings (None: a chain that reads none), labels and
    exclusion groups from the table."""
    q_ids, g_ids = results.query_ids.astype(str), results.gallery_ids.astype(str)
    return RerankContext(
        queries=embeddings.select(q_ids) if embeddings is not None else None,
        gallery=embeddings.select(g_ids) if embeddings is not None else None,
        metric=cfg.search.metric,
        exclude=exclusion_groups(table, q_ids, g_ids),
        table=table,
        query_labels=table.labels_of(q_ids),
        gallery_labels=table.labels_of(g_ids),
    )


def run_rerank(cfg: Config, table: DatasetTable, grids: bool = False) -> list[Stage]:
    """Re-rank search.output with the chain of `rerank`; save the final list and every stage's metrics (and with
    `grids`,
    result grids of the same queries per stage beside evaluate.grid)."""
    if not cfg.rerank:
        raise ConfigError(
            "rerank: expected a chain of re-rankers, e.g. rerank=[icfrr] or rerank=[centroids,kreciprocal]"
        )
    s, e = cfg.search, cfg.evaluate
    chain = build_chain(cfg.rerank)  # a bad chain fails before any file is read
    results = load_results(cfg, "rerank")
    embeddings = load_embeddings(cfg, "rerank") if uses_embeddings(chain) else None
    context = rerank_context(cfg, table, results, embeddings)
    ks = e.metric_kwargs()
    stages = run_chain(results, context, chain, **ks)
    final = stages[-1].results
    RetrievalResults(
        final.indices, final.distances, final.query_ids, final.gallery_ids, with_record(final.meta, cfg)
    ).save(s.reranked_output)
    write_stage_metrics(stages, Path(e.output).with_name("metrics_rerank.json"), record(cfg))
    if e.cmc_plot:
        curves = {key: cmc_curve(report.relevance, report.n_relevant) for key, report in stage_reports(stages).items()}
        save_cmc_curve(curves, Path(e.cmc_plot).with_name("cmc_rerank.png"))
    if grids and e.grid:
        save_stage_grids(stages, table, Path(e.grid).with_suffix(""), e.grid_queries, e.grid_top_k)
    return stages


def write_stage_metrics(stages: list[Stage], path: Path, provenance: dict | None = None) -> None:
    """Every scored stage's metrics as one JSON file, keyed as stage_reports keys them (and the run's provenance)."""
    metrics = {key: report.to_dict() for key, report in stage_reports(stages).items()}
    write_text_atomic(path, json.dumps({**metrics, **({KEY: provenance} if provenance else {})}, indent=2) + "\n")


def save_stage_grids(
    stages: list[Stage], table: DatasetTable, prefix: str | Path, n_queries: int, top_k: int
) -> list[Path]:
    """Result grids {prefix}_{i}_{stage}.png of the same queries, one per stage that ranks the original gallery
    images."""
    queries = spread_queries(stages[0].results.n_queries, n_queries)
    images, labels = stages[0].results.gallery_ids, table_labels(table, stages[0].results)
    return [
        save_result_grid(
            st.results,
            f"{prefix}_{i}_{st.name}.png",
            table.root,
            st.report.relevance if st.report else None,
            queries,
            top_k,
            labels=labels,
            scores=st.name in SCORE_RERANKERS,
        )
        for i, st in enumerate(stages)
        if len(st.results.gallery_ids) == len(images) and (st.results.gallery_ids == images).all()  # not centroids
    ]


def rerank_validation(cfg: Config, progress: Progress | None = None) -> list[Stage]:
    """The validation split embedded by the extractor, searched, then re-ranked by the chain in `rerank`: every stage
    scored; metrics_rerank.json and grids of the same queries per stage go to train.output/validation/."""
    if not cfg.rerank:
        raise ConfigError(
            "rerank: expected a chain of re-rankers to validate, e.g. rerank=[{pairwise: {weights: PATH}}]"
        )
    table = table_from_config(cfg).split("validation")
    embeddings, e = embed_table(cfg, extractor_from_config(cfg), table, progress), cfg.evaluate
    s = cfg.search  # the images' top-k (centroids, when wanted, are a stage of the chain: rerank=[centroids, ...])
    results = search_table(embeddings, table, s.k, metric=s.metric, index=s.index, device=s.device)
    ks = e.metric_kwargs()
    stages = run_chain(results, rerank_context(cfg, table, results, embeddings), build_chain(cfg.rerank), **ks)
    folder = Path(cfg.train.output) / "validation"
    write_stage_metrics(stages, folder / "metrics_rerank.json", record(cfg))
    if cfg.train.grid:
        save_stage_grids(stages, table, folder / "grid_rerank", e.grid_queries, e.grid_top_k)
    return stages
