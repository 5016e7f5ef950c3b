"""kvdedup core: content-aware hashing and a verified dedup index.

Only numpy, xxhash and the standard library are imported here -- never vllm
or torch -- so this package is usable from any process (scheduler, workers,
offline analysis).
"""

from dedup.hashing import (
    DIGEST_SIZE,
    Chunk,
    as_token_array,
    block_hashes,
    candidate_probability,
    chunk_runs,
    content_cuts,
    expected_chunk_len,
    token_digest,
)
from dedup.index import DedupIndex, Entry, EvictCallback

__all__ = [
    "DIGEST_SIZE",
    "Chunk",
    "DedupIndex",
    "Entry",
    "EvictCallback",
    "as_token_array",
    "block_hashes",
    "candidate_probability",
    "chunk_runs",
    "content_cuts",
    "expected_chunk_len",
    "token_digest",
]
