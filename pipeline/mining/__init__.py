"""Hard negative class mining (Sohn, NIPS 2016): class embeddings in FAISS, greedy selection.

`class_index` is the Ray-free core; `actor` wraps it as a named Ray actor and
holds the client the data stream uses. Import `pipeline.mining.actor` only where
Ray is wanted.
"""

from pipeline.mining.class_index import ClassEmbeddingIndex, ClassSnapshot, greedy_select

__all__ = ["ClassEmbeddingIndex", "ClassSnapshot", "greedy_select"]
