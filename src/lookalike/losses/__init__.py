"""Metric-learning losses: triplet (with miners and a cross-batch memory), centroid triplet, center loss."""

from lookalike.losses.center import CenterLoss
from lookalike.losses.centroid import CentroidTripletLoss
from lookalike.losses.miners import STRATEGIES, mine_triplets, pairwise_euclidean
from lookalike.losses.triplet import LossOutput, TripletLoss

__all__ = [
    "STRATEGIES",
    "CenterLoss",
    "CentroidTripletLoss",
    "LossOutput",
    "TripletLoss",
    "mine_triplets",
    "pairwise_euclidean",
]
