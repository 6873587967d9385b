"""World memory: episodes in LanceDB, retrieved by goal similarity (pure core, no Ray)."""

from worldagent_ray.memory.embedder import Embedder
from worldagent_ray.memory.store import EpisodeMemory, MemoryFilterError, build_where, sql_str

__all__ = ["Embedder", "EpisodeMemory", "MemoryFilterError", "build_where", "sql_str"]
