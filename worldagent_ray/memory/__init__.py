"""World memory: episodes in LanceDB, retrieved by goal similarity (pure core, no Ray)."""

from worldagent_ray.memory.embed_cache import EmbeddingCache
from worldagent_ray.memory.embedder import Embedder
from worldagent_ray.memory.filters import MemoryFilter, MemoryFilterError, build_where, sql_str
from worldagent_ray.memory.storage import storage_options_from_env
from worldagent_ray.memory.store import EpisodeMemory, QueryType

__all__ = [
    "Embedder",
    "EmbeddingCache",
    "EpisodeMemory",
    "MemoryFilter",
    "MemoryFilterError",
    "QueryType",
    "build_where",
    "sql_str",
    "storage_options_from_env",
]
