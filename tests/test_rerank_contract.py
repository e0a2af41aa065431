"""The re-ranker contract, checked on every registered re-ranker (registering one is enough to have it checked), and
the registry's rules: one class per name, capabilities declared by the classes and read by the chain and the app."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from lookalike.config import load_config
from lookalike.core.embeddings import Embeddings
from lookalike.core.errors import ConfigError, LookalikeError
from lookalike.core.protocol import exclusion_groups
from lookalike.core.results import RetrievalResults
from lookalike.data.folder import import_folder
from lookalike.models.pairwise import PairwiseModel
from lookalike.rerank import (
    CAPABILITIES,
    RERANKERS,
    RerankContext,
    Reranker,
    check_ascending,
    create_reranker,
    list_rerankers,
    register,
)
from lookalike.rerank.chain import build_chain, uses_embeddings
from lookalike.search import search_table
from lookalike.serve.index import servable_rerankers
from lookalike.train.pairwise import pairwise_spec

K = 12
# Small settings per re-ranker, each with a head shorter than the list so the tail rule is exercised; a re-ranker
# not listed here runs with its defaults.
PARAMS: dict[str, dict[str, Any]] = {
    "icfrr": {"kg": 4, "kq": 3, "n_times": 2, "candidates": 6, "distance": "search"},
    "kreciprocal": {"k1": 4, "k2": 2, "candidates": 6},
    "qe": {"n": 2, "candidates": 6},
    "dba": {"n": 2, "candidates": 6},
    "pairwise": {"top_n": 4, "progress": False},
}


@pytest.fixture(scope="module")
def setting(omniglot_small):
    """Omniglot validation images (2 characters x 20 drawings), label-clustered random embeddings, their top-K lists,
    and a random tiny pairwise model."""
    table = import_folder(omniglot_small, validation_fraction=0.25, seed=0).split("validation")
    paths = table.frame["path"].to_numpy(str)
    labels = table.frame["label"].astype("category").cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((len(paths), 8)) + 2.0 * np.eye(8)[labels]).astype(np.float32)
    embeddings = Embeddings(vectors, paths)
    results = search_table(embeddings, table, k=K)
    spec = pairwise_spec(
        load_config(None, ["pairwise.name=test_vit", "pairwise.pretrained=false", "data.image_size=32"])
    )
    return table, embeddings, results, PairwiseModel(spec).eval()


def context_for(table, embeddings: Embeddings, results: RetrievalResults) -> RerankContext:
    """Everything any re-ranker may read: embeddings in the results' order, the table, exclusion groups, labels."""
    frame = table.frame.set_index("path")["label"]
    return RerankContext(
        queries=embeddings.select(results.query_ids),
        gallery=embeddings.select(results.gallery_ids),
        exclude=exclusion_groups(table, results.query_ids, results.gallery_ids),
        table=table,
        query_labels=frame.loc[results.query_ids].to_numpy(),
        gallery_labels=frame.loc[results.gallery_ids].to_numpy(),
    )


@pytest.mark.parametrize("name", list_rerankers())
def test_every_reranker_keeps_the_contract(name, setting):
    table, embeddings, results, model = setting
    params = dict(PARAMS.get(name, {}))
    if RERANKERS[name].needs_model:
        params["weights"] = model
    reranker = create_reranker(name, **params)
    before = RetrievalResults(
        results.indices.copy(), results.distances.copy(), results.query_ids, results.gallery_ids, dict(results.meta)
    )
    out = reranker.rerank(results, context_for(table, embeddings, results))

    np.testing.assert_array_equal(out.query_ids, before.query_ids)  # the same queries, in the same order
    assert out.indices.shape == (before.n_queries, out.k)
    check_ascending(out)
    rows, cols = np.nonzero(out.valid)
    assert not np.isnan(out.distances[rows, cols]).any()
    gallery_ids = np.asarray(out.gallery_ids)[out.indices[rows, cols]]
    assert len(set(zip(rows.tolist(), gallery_ids.tolist()))) == len(rows)  # no gallery item twice in a row
    np.testing.assert_array_equal(results.indices, before.indices)  # the incoming list is left as it was
    head = reranker.head
    if head is not None:
        assert head < K
        np.testing.assert_array_equal(out.indices[:, head:], before.indices[:, head:])  # the tail kept, in place
        np.testing.assert_array_equal(out.distances[:, head:], before.distances[:, head:])
        np.testing.assert_array_equal(np.sort(out.indices[:, :head], 1), np.sort(before.indices[:, :head], 1))
    record = out.meta["rerank"][-1]
    assert record["name"] == name
    assert {key: record.get(key) for key in reranker.params()} == reranker.params()
    assert set(params) - {"weights", "progress"} <= set(record)  # every ranking parameter given is recorded


def test_capabilities_are_declared_booleans_and_filter_the_list():
    for name in list_rerankers():
        assert all(isinstance(getattr(RERANKERS[name], c), bool) for c in CAPABILITIES), name
    assert list_rerankers(needs_images=True) == ["pairwise"]
    assert list_rerankers(first_only=True) == list_rerankers(servable=False) == ["centroids"]
    assert "pairwise" not in list_rerankers(needs_vectors=True)
    with pytest.raises(LookalikeError, match="unknown capability 'fast'"):
        list_rerankers(fast=True)


class _Probe(Reranker):
    """A re-ranker outside the package: keeps the list as it is."""

    name: ClassVar[str] = "contract_probe"
    needs_vectors = False

    def rerank(self, results: RetrievalResults, context: RerankContext) -> RetrievalResults:
        """The same list, recorded."""
        return self.recorded(
            RetrievalResults(results.indices, results.distances, results.query_ids, results.gallery_ids)
        )


def test_register_refuses_a_name_taken_by_another_class():
    class Impostor(_Probe):
        name = "qe"

    before = RERANKERS["qe"]
    with pytest.raises(LookalikeError, match=r"the name 'qe' is taken by lookalike\.rerank\.query_expansion"):
        register(Impostor)
    assert RERANKERS["qe"] is before
    assert register(before) is before  # the same class again (a module reload) is not a clash


def test_the_chain_and_the_app_read_capabilities_not_names(monkeypatch):
    monkeypatch.setitem(RERANKERS, _Probe.name, _Probe)
    assert servable_rerankers([_Probe.name]).keys() == {_Probe.name}  # servable by declaration, in no list of names
    assert not uses_embeddings(build_chain([_Probe.name]))
    monkeypatch.setattr(_Probe, "servable", False)
    with pytest.raises(ConfigError, match=r"'contract_probe' cannot run in the web app; expected one of dba, icfrr"):
        servable_rerankers([_Probe.name])
    monkeypatch.setattr(_Probe, "first_only", True)
    with pytest.raises(ConfigError, match=r"rerank\[1\]: contract_probe must be the first stage"):
        build_chain(["qe", _Probe.name])
