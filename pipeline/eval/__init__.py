"""Evaluation: embed shard sets with Ray Data, then retrieval / verification / VehicleID metrics."""
