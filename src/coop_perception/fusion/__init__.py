"""Cooperative fusion: compact feature codec, pose buffers, alignment, trust, fusion, pipeline."""
