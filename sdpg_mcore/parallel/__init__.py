"""Process groups (TP/PP/CP/DP), launch from torchrun or Slurm, and the CPU compatibility layer."""
