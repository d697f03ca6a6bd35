"""Training: the trajectory loss, EMA weights, a step-indexed batch order and the LightningModule."""
