"""Re-rankers over RetrievalResults: ICFRR, k-reciprocal, query expansion, chained."""

from lookalike.rerank.base import (
    RERANKERS,
    RerankContext,
    Reranker,
    check_ascending,
    create_reranker,
    list_rerankers,
    register,
)

__all__ = ["RERANKERS", "RerankContext", "Reranker", "check_ascending", "create_reranker", "list_rerankers", "register"]
from lookalike.rerank.kreciprocal import KReciprocal
from lookalike.rerank.query_expansion import DatabaseAugmentation, QueryExpansion

__all__ += ["DatabaseAugmentation", "KReciprocal", "QueryExpansion"]
from lookalike.rerank.icfrr import (  # noqa: E402
    ICFRR,
    icfrr_iterations,
    icfrr_metrics,
    load_icfrr_cache,
    plot_icfrr_curve,
    run_icfrr_cache,
    save_icfrr_cache,
    save_rank_strips,
)

__all__ += [
    "ICFRR",
    "icfrr_iterations",
    "icfrr_metrics",
    "load_icfrr_cache",
    "plot_icfrr_curve",
    "run_icfrr_cache",
    "save_icfrr_cache",
    "save_rank_strips",
]
from lookalike.rerank.centroids import CentroidRanker  # noqa: E402
from lookalike.rerank.chain import Stage, build_chain, run_chain, stage_report  # noqa: E402

__all__ += ["CentroidRanker", "Stage", "build_chain", "run_chain", "stage_report"]
from lookalike.rerank.pairwise import PairwiseReranker, merge_top_n  # noqa: E402

__all__ += ["PairwiseReranker", "merge_top_n"]
