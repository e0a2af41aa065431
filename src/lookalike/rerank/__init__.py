"""Re-rankers over RetrievalResults: ICFRR, k-reciprocal, query expansion, STIR pairwise, centroids, chained.

The interface, the registry, the shared helpers and the one merge rule (`merge_head`) live in rerank/base.py."""

from lookalike.rerank.base import (
    CAPABILITIES,
    RERANKERS,
    RerankContext,
    Reranker,
    check_ascending,
    create_reranker,
    list_rerankers,
    merge_head,
    register,
)

__all__ = [
    "CAPABILITIES",
    "RERANKERS",
    "RerankContext",
    "Reranker",
    "check_ascending",
    "create_reranker",
    "list_rerankers",
    "merge_head",
    "register",
]
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
from lookalike.rerank.pairwise import PairwiseReranker  # noqa: E402

__all__ += ["PairwiseReranker"]
