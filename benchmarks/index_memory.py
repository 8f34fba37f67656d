"""Measure FAISS memory per vector, search throughput and recall for three index kinds.

Builds exact (flat inner product), HNSW and IVF-PQ indexes over the same random unit
vectors. For each kind it reports the serialised index size per vector, the growth of
the process's resident memory while the index was built, batch search throughput
(queries per second) and recall@k against the exact index. Each figure also gets its
ratio to the flat index measured in the same run.

Random unit vectors in 512 dimensions have no cluster structure: every pair is nearly
orthogonal, so the true k nearest neighbours of a random query are barely nearer than
the rest, which is a worst case for approximate indexes. The run therefore also asks
near-duplicate queries (a stored vector plus noise, cosine about 0.89 to it) and reports
how often the source vector comes back first, the case of an image that finds itself.
Memory and throughput depend far less on the data than recall does.

Example (about two minutes on 2 CPU cores)::

    python benchmarks/index_memory.py --n 100000 --dim 512 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class IndexResult:
    """Figures for one index kind."""

    kind: str
    params: str
    build_seconds: float
    bytes_per_vector: float
    rss_growth_bytes_per_vector: float
    queries_per_second: float
    recall_at_k: float
    near_duplicate_top1: float


def resident_bytes() -> int:
    """Return this process's resident set size, read from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def cpu_model() -> str:
    """Return the processor model name from /proc/cpuinfo, or the machine type."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def random_unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n vectors uniformly on the unit sphere in dim dimensions, as float32."""
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def near_duplicates(
    base: np.ndarray, count: int, noise_norm: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return unit queries near randomly chosen base vectors, and those vectors' ids.

    Each query is a base vector plus a random direction of length noise_norm, so its
    cosine to the source is 1 / sqrt(1 + noise_norm**2) (0.89 for 0.5).
    """
    sources = rng.choice(base.shape[0], size=count, replace=False)
    noise = random_unit_vectors(count, base.shape[1], rng) * noise_norm
    queries = base[sources] + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries, sources.astype(np.int64)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Return the mean fraction of the true k nearest ids that appear in found."""
    k = truth.shape[1]
    hits = sum(
        len(set(row_found) & set(row_truth))
        for row_found, row_truth in zip(found, truth, strict=True)
    )
    return hits / (k * truth.shape[0])


def measure(
    kind: str,
    params: str,
    build: Callable[[], faiss.Index],
    base: np.ndarray,
    queries: np.ndarray,
    k: int,
    truth: np.ndarray | None,
    search_repeats: int,
    near_queries: np.ndarray,
    near_sources: np.ndarray,
) -> tuple[IndexResult, np.ndarray]:
    """Build one index, then time a batch search and score it against truth.

    Returns the figures and the ids that the index found, so that the exact index's
    ids can serve as the truth for the others.
    """
    n = base.shape[0]
    rss_before = resident_bytes()
    started = time.perf_counter()
    index = build()
    build_seconds = time.perf_counter() - started
    rss_growth = resident_bytes() - rss_before
    serialised = faiss.serialize_index(index)
    logger.info(
        "%s: built in %.1f s, %d bytes serialised", kind, build_seconds, serialised.size
    )

    # One warm-up pass, then the best of a few timed passes over the whole query batch.
    _, ids = index.search(queries, k)
    best = float("inf")
    for _ in range(search_repeats):
        started = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - started)
    _, near_ids = index.search(near_queries, 1)

    result = IndexResult(
        kind=kind,
        params=params,
        build_seconds=build_seconds,
        bytes_per_vector=serialised.size / n,
        rss_growth_bytes_per_vector=rss_growth / n,
        queries_per_second=queries.shape[0] / best,
        recall_at_k=1.0 if truth is None else recall_at_k(ids, truth),
        near_duplicate_top1=float(np.mean(near_ids[:, 0] == near_sources)),
    )
    del index, serialised
    return result, ids


def build_flat(base: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(base.shape[1]))
    index.add_with_ids(base, np.arange(base.shape[0], dtype=np.int64))
    return index


def build_hnsw(
    base: np.ndarray, m: int, ef_construction: int, ef_search: int
) -> faiss.Index:
    index = faiss.IndexHNSWFlat(base.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
    index.add(base)
    return index


def build_ivfpq(
    base: np.ndarray, nlist: int, pq_m: int, nprobe: int, train_size: int
) -> faiss.Index:
    dim = base.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(base[:train_size])
    index.add(base)
    index.nprobe = nprobe
    return index


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, default=100_000, help="number of indexed vectors"
    )
    parser.add_argument("--dim", type=int, default=512, help="vector dimension")
    parser.add_argument(
        "--queries", type=int, default=1_000, help="number of query vectors"
    )
    parser.add_argument("--k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--threads", type=int, default=2, help="FAISS (OpenMP) threads")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed search passes per index"
    )
    parser.add_argument(
        "--hnsw-m", type=int, default=32, help="HNSW links per node (M)"
    )
    parser.add_argument(
        "--ef-construction", type=int, default=40, help="HNSW efConstruction"
    )
    parser.add_argument("--ef-search", type=int, default=64, help="HNSW efSearch")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF-PQ inverted lists")
    parser.add_argument(
        "--pq-m", type=int, default=64, help="IVF-PQ sub-quantizers (8 bits each)"
    )
    parser.add_argument(
        "--nprobe", type=int, default=16, help="IVF-PQ lists visited per query"
    )
    parser.add_argument(
        "--train-size", type=int, default=50_000, help="vectors used to train IVF-PQ"
    )
    parser.add_argument(
        "--json", type=Path, help="also write the results to this JSON file"
    )
    args = parser.parse_args(argv)

    if args.dim % args.pq_m != 0:
        parser.error(
            f"--pq-m {args.pq_m} must divide --dim {args.dim}; "
            "pick a divisor of the dimension, such as 64 for 512"
        )
    if args.train_size > args.n:
        parser.error(f"--train-size {args.train_size} exceeds --n {args.n}; lower it")
    if args.k > args.n:
        parser.error(f"--k {args.k} exceeds --n {args.n}; lower it")
    return args


def format_table(results: list[IndexResult]) -> str:
    """Format the results as a Markdown table with ratios to the first (flat) row."""
    flat = results[0]
    lines = [
        "| index | parameters | bytes/vector | vs flat | RSS growth/vector "
        "| QPS | vs flat | recall@k | near-duplicate top-1 | build s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.kind} | {result.params} | {result.bytes_per_vector:,.0f} "
            f"| {result.bytes_per_vector / flat.bytes_per_vector:.3f} "
            f"| {result.rss_growth_bytes_per_vector:,.0f} "
            f"| {result.queries_per_second:,.0f} "
            f"| {result.queries_per_second / flat.queries_per_second:.1f} "
            f"| {result.recall_at_k:.3f} | {result.near_duplicate_top1:.3f} "
            f"| {result.build_seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    faiss.omp_set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    base = random_unit_vectors(args.n, args.dim, rng)
    queries = random_unit_vectors(args.queries, args.dim, rng)
    near_queries, near_sources = near_duplicates(base, args.queries, 0.5, rng)
    logger.info(
        "data: %d x %d base vectors, %d queries", args.n, args.dim, args.queries
    )

    flat_result, truth = measure(
        "flat (IDMap2 + FlatIP)",
        "exact",
        lambda: build_flat(base),
        base,
        queries,
        args.k,
        None,
        args.repeats,
        near_queries,
        near_sources,
    )
    results = [flat_result]

    hnsw_params = f"M={args.hnsw_m}, efC={args.ef_construction}, efS={args.ef_search}"
    hnsw_result, _ = measure(
        "HNSW (HNSWFlat)",
        hnsw_params,
        lambda: build_hnsw(base, args.hnsw_m, args.ef_construction, args.ef_search),
        base,
        queries,
        args.k,
        truth,
        args.repeats,
        near_queries,
        near_sources,
    )
    results.append(hnsw_result)

    ivfpq_params = f"nlist={args.nlist}, m={args.pq_m}x8 bit, nprobe={args.nprobe}"
    ivfpq_result, _ = measure(
        "IVF-PQ (IVFPQ)",
        ivfpq_params,
        lambda: build_ivfpq(base, args.nlist, args.pq_m, args.nprobe, args.train_size),
        base,
        queries,
        args.k,
        truth,
        args.repeats,
        near_queries,
        near_sources,
    )
    results.append(ivfpq_result)

    header = {
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": datetime.date.today().isoformat(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        # Other processes on the same cores lower the QPS figures. Ratios measured
        # in one run are affected less.
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    sys.stdout.write(
        json.dumps(header, indent=2) + "\n\n" + format_table(results) + "\n"
    )
    if args.json is not None:
        payload = {**header, "results": [asdict(result) for result in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
