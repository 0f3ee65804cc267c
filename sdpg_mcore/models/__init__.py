"""HF config -> Megatron-Core TransformerConfig + layer spec, and GPTModel construction for any TP/PP."""
