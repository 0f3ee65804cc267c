"""Hugging Face <-> Megatron-Core checkpoint conversion: per-architecture maps, streaming, resharding."""
