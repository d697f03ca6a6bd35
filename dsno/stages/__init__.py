"""The pipeline's stages, each a plain function of a validated RunConfig:
trajectories (teacher stage), training, evaluation. Entry points stay thin."""
