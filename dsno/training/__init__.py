"""Training: the trajectory loss, EMA weights, a step-indexed sampler and the LightningModule."""
