"""Measure search throughput, recall@10, memory and build time of each index kind.

Builds the service's own indexes (``service.index.build_index``) over clustered
synthetic unit vectors: 1,000 random centres in ``--dim`` dimensions, each
vector a centre plus Gaussian noise, normalised (cosine to its centre about
0.7). Queries come from the same distribution. For HNSW and IVF-PQ it reports
recall@10 against the exact index for a few ``ef_search`` and ``nprobe``
values, queries per second of one batched search call, bytes per vector of the
serialised index and build time, each also as a ratio to the exact index
measured in the same run. Writes a Markdown section to ``--out``.

With ``--rerank-factors``, IVF-PQ is also measured with re-ranking: it fetches
factor x k candidates and orders them by the exact inner product with their
float vectors (``service.index.rerank_exact``). Here the vectors come from the
benchmark's in-memory array; the service reads them from its SQLite store,
which adds the time of that read.

Example (2 CPU cores)::

    python benchmarks/search.py --sizes 100000 1000000 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from service.index import (
    IndexConfig,
    SearchParams,
    VectorIndex,
    build_index,
    rerank_exact,
)

logger = logging.getLogger(__name__)

K = 10


@dataclass
class Row:
    """Figures of one index kind and search setting."""

    size: int
    kind: str
    setting: str
    build_s: float
    bytes_per_vector: float
    qps: float
    recall: float


def clustered_unit_vectors(
    n: int, dim: int, rng: np.random.Generator, centres: np.ndarray
) -> np.ndarray:
    """Return n unit vectors, each a random centre plus noise, in chunks."""
    out = np.empty((n, dim), dtype=np.float32)
    noise = 1.0 / np.sqrt(dim)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        picks = rng.integers(0, len(centres), stop - start)
        chunk = centres[picks] + rng.normal(0, noise, (stop - start, dim))
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def serialized_bytes(index: VectorIndex) -> int:
    with tempfile.TemporaryDirectory() as folder:
        names = index.write(Path(folder) / "index.faiss")
        return sum((Path(folder) / name).stat().st_size for name in names)


def time_search(
    index: VectorIndex,
    queries: np.ndarray,
    params: SearchParams | None,
    vectors: np.ndarray,
    rerank_factor: int = 1,
) -> tuple[float, np.ndarray]:
    """Return queries per second and the keys found, re-ranked if asked."""
    start = time.perf_counter()
    _, keys = index.search(queries, K * rerank_factor, params)
    if rerank_factor > 1:
        all_keys = np.arange(len(vectors), dtype=np.int64)
        _, keys = rerank_exact(queries, keys, all_keys, vectors, K)
    return len(queries) / (time.perf_counter() - start), keys


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def run_size(
    size: int,
    dim: int,
    queries_n: int,
    config: IndexConfig,
    seed: int,
    kinds: list[str],
    rerank_factors: list[int],
) -> list[Row]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = clustered_unit_vectors(size, dim, rng, centres)
    queries = clustered_unit_vectors(queries_n, dim, rng, centres)
    keys = np.arange(size, dtype=np.int64)
    rows: list[Row] = []

    settings: dict[str, list[tuple[SearchParams, int]]] = {
        "exact": [(SearchParams(), 1)],
        "hnsw": [(SearchParams(ef_search=e), 1) for e in (32, 64, 128)],
        "ivfpq": [
            (SearchParams(nprobe=p), factor)
            for p in (8, 32, 128)
            for factor in rerank_factors
        ],
    }
    truth = None
    for kind, param_list in settings.items():
        if kind not in kinds:
            continue
        kind_config = IndexConfig(
            kind=kind,
            hnsw_m=config.hnsw_m,
            hnsw_ef_construction=config.hnsw_ef_construction,
        )
        logger.info("Building %s over %d vectors", kind, size)
        start = time.perf_counter()
        index = build_index(kind_config, dim, keys, vectors)
        build_s = time.perf_counter() - start
        size_bytes = serialized_bytes(index)
        for params, factor in param_list:
            qps, found = time_search(index, queries, params, vectors, factor)
            if truth is None:
                truth = found
            setting = (
                f"ef_search={params.ef_search}"
                if params.ef_search
                else f"nprobe={params.nprobe}"
                if params.nprobe
                else "-"
            )
            if factor > 1:
                setting += f", rerank {factor}x"
            rows.append(
                Row(
                    size,
                    kind,
                    setting,
                    build_s,
                    size_bytes / size,
                    qps,
                    recall_at_k(found, truth),
                )
            )
            logger.info("%s", rows[-1])
        del index
    return rows


def markdown(rows: list[Row], command: str, config: IndexConfig, threads: int) -> str:
    lines = [
        "## Search: index kinds",
        "",
        f"Command: `{command}`",
        "",
        f"Hardware: {threads} CPU cores, no GPU ({platform.processor() or 'x86_64'}, "
        f"FAISS {faiss.__version__}). Date: {datetime.date.today().isoformat()}.",
        "",
        "Data: clustered synthetic unit vectors (1,000 centres plus Gaussian noise, "
        "512 dimensions), not real embeddings. QPS is one batched search call of "
        f"the queries with k={K}; recall@{K} is against the exact index. HNSW "
        f"uses M={config.hnsw_m}, efConstruction={config.hnsw_ef_construction}; "
        "IVF-PQ uses the service's derived nlist, m and nbits. `rerank Nx` "
        "re-ranks N x k IVF-PQ candidates by their exact float vectors, read "
        "from memory here. Ratios are to the exact index of the same size in "
        "the same run.",
        "",
        "| vectors | kind | setting | build s | bytes/vector | QPS | recall@10 "
        "| build ratio | memory ratio | QPS ratio |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        exact = next(r for r in rows if r.size == row.size and r.kind == "exact")
        lines.append(
            f"| {row.size:,} | {row.kind} | {row.setting} | {row.build_s:.1f} | "
            f"{row.bytes_per_vector:.0f} | {row.qps:,.0f} | {row.recall:.3f} | "
            f"{row.build_s / max(exact.build_s, 1e-9):.1f} | "
            f"{row.bytes_per_vector / exact.bytes_per_vector:.3f} | "
            f"{row.qps / exact.qps:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512, help="Embedding size.")
    parser.add_argument("--queries", type=int, default=1000, help="Query count.")
    parser.add_argument("--threads", type=int, default=2, help="FAISS threads.")
    parser.add_argument("--hnsw-m", type=int, default=16, help="HNSW M.")
    parser.add_argument(
        "--ef-construction", type=int, default=40, help="HNSW efConstruction."
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=["exact", "hnsw", "ivfpq"],
        default=["exact", "hnsw", "ivfpq"],
        help="Index kinds to measure; exact is needed for recall.",
    )
    parser.add_argument(
        "--rerank-factors",
        type=int,
        nargs="+",
        default=[1],
        help="IVF-PQ re-ranking factors to measure; 1 is no re-ranking.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Markdown file for the results section (default: print it); the "
        "published copy is a section of docs/benchmarks.md.",
    )
    args = parser.parse_args()
    if "exact" not in args.kinds:
        parser.error("--kinds must include exact, the reference for recall")
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    faiss.omp_set_num_threads(args.threads)
    config = IndexConfig(hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction)

    rows: list[Row] = []
    for size in args.sizes:
        rows += run_size(
            size,
            args.dim,
            args.queries,
            config,
            seed=size,
            kinds=args.kinds,
            rerank_factors=args.rerank_factors,
        )
    command = (
        f"python benchmarks/search.py --sizes {' '.join(map(str, args.sizes))} "
        f"--threads {args.threads} --hnsw-m {args.hnsw_m} "
        f"--ef-construction {args.ef_construction} "
        f"--kinds {' '.join(args.kinds)} "
        f"--rerank-factors {' '.join(map(str, args.rerank_factors))}"
    )
    section = markdown(rows, command, config, args.threads)
    if args.out is None:
        sys.stdout.write(section)
    else:
        args.out.write_text(section)
        logger.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()
