"""CPU fast paths written in Python/torch (what runs on machines without a GPU)."""
