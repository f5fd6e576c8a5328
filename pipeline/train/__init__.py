"""Training: the driver (Ray, MLflow, TorchTrainer) and the per-worker loop."""
