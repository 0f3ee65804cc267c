"""The SDPG trainer: step loop, batches and micro-batches, forward functions, checkpoints, eval, logging."""
