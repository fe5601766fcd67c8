"""Routing time, before the core: query -> tags (taggers), phrase encoder, tag alignment
(HNSW), the normalization mapping applied to generated tags, and the on-disk caches.

Nothing here imports build or research code.
"""
