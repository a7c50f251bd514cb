"""kNN speed: reprlab (faiss) vs scikit-learn, torch and lightly.

kNN classification of the same features by each, timed end to end and checked to agree.

    python scripts/benchmark.py knn                   # 50,000 x 10,000 x 512-d, 10 classes, k=200
    python scripts/benchmark.py knn --scaling         # time against bank size: flat vs IVF vs HNSW (+ recall)
    python scripts/benchmark.py knn --evaluate-cifar  # end-to-end `evaluate` on CIFAR-10, a small encoder
    python scripts/benchmark.py knn --bank 5000 --queries 1000 --repeats 1   # smoke run

Features are seeded Gaussian noise plus a per-class direction (``--signal``), L2-normalised, so predictions
mean something and cross-method agreement is checked: every method votes with exp(cos / temperature) over its
k nearest bank items. Each method is timed end to end (index build / fit included) after its imports; the
sgemm rate measured in the same run is the yardstick (the similarity matmul is 2 N Q D FLOPs). Prints tables
and appends one JSON line to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench import peers
from bench.common import append_jsonl, environment, log, print_table, sgemm_gflops

DEFAULT_OUT = "benchmarks/results.jsonl"


# --------------------------------------------------------------------------------------------- data


def make_features(num: int, dim: int, classes: int, signal: float, generator: torch.Generator,
                  centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num, dim) unit rows of noise + ``signal`` x the class centroid, and their labels (num,)."""
    labels = torch.randint(0, classes, (num,), generator=generator)
    x = torch.randn(num, dim, generator=generator) + signal * centroids[labels]  # (num, dim)
    return F.normalize(x, dim=1).contiguous(), labels


def make_structured_features(num: int, dim: int, latent: int, classes: int, generator: torch.Generator,
                             projection: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(num, dim) unit rows with a ``latent``-dimensional structure (class blobs in latent space, a fixed
    random projection, small isotropic noise): closer to real embeddings (effective rank << dim) than pure
    noise, which is the worst case for approximate indexes."""
    labels = torch.randint(0, classes, (num,), generator=generator)
    z = torch.randn(num, latent, generator=generator) + centroids[labels]  # (num, latent)
    noise = 0.5 * torch.randn(num, dim, generator=generator)  # (num, dim)
    return F.normalize(z @ projection + noise, dim=1).contiguous()


# --------------------------------------------------------------------------------------------- methods


def reprlab_backend(backend: str):
    """reprlab's ``knn_classify`` with ``backend`` (``auto``, the default, probes the exact backends on its first
    queries in its first run; the later runs reuse the choice)."""
    def run(bank, bank_labels, queries, args) -> torch.Tensor:
        from reprlab.evaluate.knn import knn_classify

        return knn_classify(bank, bank_labels, queries, k=args.k, temperature=args.temperature,
                            backend=backend).predictions

    return run


def run_faiss_index(bank, bank_labels, queries, args) -> torch.Tensor:
    """faiss's own ``IndexFlatIP.search`` (its bundled BLAS), voting as everywhere else."""
    import faiss

    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank.numpy())
    sims, idx = index.search(queries.numpy(), args.k)
    scores = torch.zeros(queries.shape[0], args.classes, dtype=torch.float64)
    weights = (torch.from_numpy(sims).double() / args.temperature).exp()  # (Q, k)
    scores.scatter_add_(1, bank_labels[torch.from_numpy(idx)], weights)
    return scores.argmax(dim=1)


def run_torch_reference(bank, bank_labels, queries, args) -> torch.Tensor:
    """The loop every peer writes: chunked matmul, topk, exp(sim / T) votes with scatter_add."""
    predictions = []
    for start in range(0, queries.shape[0], args.chunk):
        sims, idx = (queries[start : start + args.chunk] @ bank.T).topk(args.k, dim=1)  # (chunk, k)
        scores = torch.zeros(sims.shape[0], args.classes).scatter_add_(1, bank_labels[idx],
                                                                       (sims / args.temperature).exp())
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions)


def run_lightly(bank, bank_labels, queries, args) -> torch.Tensor:
    return peers.lightly_knn(bank, bank_labels, queries, args.classes, args.k, args.temperature, args.chunk)


def run_sklearn(bank, bank_labels, queries, args) -> torch.Tensor:
    from sklearn.neighbors import KNeighborsClassifier

    temperature = args.temperature

    def weights(distance: np.ndarray) -> np.ndarray:  # cosine distance = 1 - cosine similarity
        return np.exp((1.0 - distance) / temperature)

    model = KNeighborsClassifier(n_neighbors=args.k, metric="cosine", algorithm="brute", weights=weights,
                                 n_jobs=args.threads)
    model.fit(bank.numpy(), bank_labels.numpy())
    return torch.from_numpy(model.predict(queries.numpy()))


# name on the command line: (name in the table, module imported before timing, function)
METHODS = {
    "reprlab": ("reprlab (default backend: auto)", "reprlab.evaluate.knn", reprlab_backend("auto")),
    "reprlab-faiss": ("reprlab (faiss backend)", "reprlab.evaluate.knn", reprlab_backend("faiss")),
    "reprlab-faiss_heap": ("reprlab (faiss_heap backend)", "reprlab.evaluate.knn", reprlab_backend("faiss_heap")),
    "reprlab-torch": ("reprlab (torch backend)", "reprlab.evaluate.knn", reprlab_backend("torch")),
    "faiss": ("faiss IndexFlatIP.search", "faiss", run_faiss_index),
    "torch": ("torch reference", "torch", run_torch_reference),
    "lightly": ("lightly knn_predict", "lightly.utils.benchmarking", run_lightly),
    "sklearn": ("scikit-learn (brute, cosine)", "sklearn.neighbors", run_sklearn),
}
REFERENCE = "reprlab"


def run_comparison(args: argparse.Namespace) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed)
    centroids = torch.randn(args.classes, args.dim, generator=generator)
    bank, bank_labels = make_features(args.bank, args.dim, args.classes, args.signal, generator, centroids)
    queries, query_labels = make_features(args.queries, args.dim, args.classes, args.signal, generator,
                                          centroids)
    gflop = 2 * args.bank * args.queries * args.dim / 1e9
    log(f"sgemm rate now ({torch.get_num_threads()} threads) ...")
    sgemm = sgemm_gflops()
    results, predictions = {}, {}
    # untimed warm-up (thread pools, first calls), so that the method timed first is not the one that pays it
    reprlab_backend("faiss")(bank[:2048], bank_labels[:2048], queries[:256], args)
    available = {}
    for name, (_, module, method) in METHODS.items():
        if name not in args.methods:
            continue
        try:
            importlib.import_module(module)  # imports are not timed (lightly pulls in pytorch_lightning)
        except ImportError as error:
            log(f"skipping {name}: {error} (pip install {module.split('.')[0]} to include it)")
            results[name] = {"skipped": str(error)}
            continue
        available[name] = method
    times: dict[str, list[float]] = {name: [] for name in available}
    for repeat in range(args.repeats):  # round robin, so that the shared machine's drift reaches every method
        for name, method in available.items():
            start = time.perf_counter()
            predictions[name] = method(bank, bank_labels, queries, args).long()
            times[name].append(time.perf_counter() - start)
            log(f"{name} run {repeat}: {times[name][-1]:.2f} s")
    for name, runs in times.items():
        median = statistics.median(runs)
        results[name] = {"median_s": median, "first_s": runs[0], "runs_s": [round(t, 3) for t in runs],
                         "top1": float((predictions[name] == query_labels).float().mean()),
                         "similarity_gflops": gflop / median}
    reference = predictions.get(REFERENCE)
    for name, row in results.items():
        if "median_s" not in row or reference is None:
            continue
        row["slowdown_vs_reprlab"] = row["median_s"] / results[REFERENCE]["median_s"]
        row["agreement_vs_reprlab"] = float((predictions[name] == reference).float().mean())
    rows = [{"method": METHODS[name][0], **row} for name, row in results.items() if "median_s" in row]
    if "reprlab" in predictions:
        from reprlab.evaluate.search import chosen_backends

        log(f"auto chose: {chosen_backends() or 'faiss (no probe: a small problem)'}")
    print_table(rows, ["method", "median_s", "first_s", "slowdown_vs_reprlab", "agreement_vs_reprlab", "top1",
                       "similarity_gflops"],
                title=f"kNN: bank {args.bank:,} x queries {args.queries:,} x {args.dim}-d, {args.classes} "
                      f"classes, k={args.k}, T={args.temperature}; sgemm {sgemm:.0f} GFLOP/s, similarity "
                      f"matmul {gflop:.1f} GFLOP (floor {gflop / sgemm:.2f} s)")
    return {"sgemm_gflops": sgemm, "similarity_gflop": gflop, "floor_s": gflop / sgemm, "methods": results}


# --------------------------------------------------------------------------------------------- scaling


SCALING_INDEXES = {"flat": {}, "ivf": {}, "ivf nprobe=64": {"nprobe": 64}, "hnsw": {}}


def run_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Search time (index build included: an evaluation builds its index once) against bank size, exact flat
    vs IVF (reprlab's default nprobe, and nprobe=64) vs HNSW, with recall@k against flat."""
    from reprlab.evaluate.knn import knn_search

    generator = torch.Generator().manual_seed(args.seed)
    projection = torch.randn(args.scaling_latent, args.dim, generator=generator)
    centroids = 2 * torch.randn(args.classes, args.scaling_latent, generator=generator)

    def features(num: int) -> torch.Tensor:
        return make_structured_features(num, args.dim, args.scaling_latent, args.classes, generator,
                                        projection, centroids)

    queries = features(args.scaling_queries)
    rows = []
    for size in args.scaling_banks:
        bank = features(size)
        exact = None
        for name, options in SCALING_INDEXES.items():
            index = name.split()[0]
            if index == "hnsw" and size > args.hnsw_max_bank:
                log(f"bank {size:,}: skipping hnsw (graph build too slow above --hnsw-max-bank)")
                continue
            start = time.perf_counter()
            _, idx = knn_search(bank, queries, args.k, backend="faiss", index=index, **options)  # (Q, k)
            seconds = time.perf_counter() - start
            if exact is None:
                exact = idx
            found = (idx[:, :, None] == exact[:, None, :]).any(dim=1)  # (Q, k): exact neighbour retrieved
            rows.append({"bank": size, "index": name, "seconds": seconds,
                         "recall_at_k": float(found.float().mean()),
                         "queries_per_s": args.scaling_queries / seconds})
            log(f"bank {size:,} {name}: {seconds:.2f} s, recall {rows[-1]['recall_at_k']:.3f}")
        flat = next(r for r in rows if r["bank"] == size and r["index"] == "flat")
        for row in rows:
            if row["bank"] == size:
                row["speedup_vs_flat"] = flat["seconds"] / row["seconds"]
    print_table(rows, ["bank", "index", "seconds", "speedup_vs_flat", "recall_at_k", "queries_per_s"],
                title=f"kNN search against bank size ({args.scaling_queries:,} queries, {args.dim}-d with "
                      f"{args.scaling_latent}-d structure, k={args.k}; index build + search)")
    return rows


# --------------------------------------------------------------------------------------------- end to end


def run_evaluate_cifar(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of reprlab's `evaluate` on CIFAR-10 (train bank, val for selection, test read once)."""
    from reprlab.config import DataConfig, EncoderConfig, EvaluateConfig
    from reprlab.stages.evaluate import evaluate

    out_dir = Path(args.evaluate_out or tempfile.mkdtemp(prefix="reprlab-bench-eval-"))
    kwargs = {"cifar_stem": True} if args.cifar_stem else {}
    cfg = EvaluateConfig(name="bench_evaluate_cifar", out_dir=str(out_dir), encoders=[args.encoder],
                         arch=EncoderConfig(name=args.arch, kwargs=kwargs),
                         data=DataConfig(name=f"npz:{args.cifar_dir}", limit=args.limit), device=args.device,
                         cache_features=False, seed=args.seed)
    start = time.perf_counter()
    run_dir = evaluate(cfg)
    seconds = time.perf_counter() - start
    summary = json.loads((run_dir / "metrics.json").read_text())
    label, metrics = next(iter(summary["encoders"].items()))
    timings = metrics["timings_s"]
    timings["report_and_rest_s"] = seconds - sum(timings.values())
    rows = [{"phase": phase, "seconds": value} for phase, value in timings.items()]
    rows.append({"phase": "total", "seconds": seconds})
    print_table(rows, ["phase", "seconds"],
                title=f"evaluate on CIFAR-10 ({summary['num_images']}) for {label} on {args.device}: "
                      f"kNN top-1 {100 * metrics['knn_top1']:.2f}%")
    return {"encoder": label, "total_s": seconds, "timings_s": timings, "num_images": summary["num_images"],
            "knn_top1": metrics["knn_top1"], "linear_probe_top1": metrics.get("linear_probe_top1"),
            "run_dir": str(run_dir)}


# --------------------------------------------------------------------------------------------- main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bank", type=int, default=50_000, help="bank (train) features")
    parser.add_argument("--queries", type=int, default=10_000, help="query (test) features")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--signal", type=float, default=0.1,
                        help="weight of the class direction in the features (0.1: about 65%% top-1)")
    parser.add_argument("--chunk", type=int, default=1000, help="queries per matmul (torch methods, lightly)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch / faiss / sklearn threads "
                                                                  "(default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON lines file to append the result to")
    parser.add_argument("--scaling", action="store_true", help="also time flat / IVF / HNSW by bank size")
    parser.add_argument("--scaling-banks", type=int, nargs="+", default=[10_000, 50_000, 200_000, 1_000_000])
    parser.add_argument("--scaling-queries", type=int, default=1000)
    parser.add_argument("--scaling-latent", type=int, default=32, help="intrinsic dimension of the features")
    parser.add_argument("--hnsw-max-bank", type=int, default=200_000)
    parser.add_argument("--evaluate-cifar", action="store_true", help="also time `evaluate` end to end")
    parser.add_argument("--cifar-dir", default="/work/shared/data/cifar10", help="train.npz + test.npz")
    parser.add_argument("--encoder", default="random", help="'random' (untrained --arch) or a run directory")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--cifar-stem", action="store_true", help="3x3 stem, no max-pool (16x the FLOPs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=None, help="train images, --evaluate-cifar (smoke)")
    parser.add_argument("--evaluate-out", default=None, help="where the evaluate run goes (default: temp)")
    parser.add_argument("--skip-comparison", action="store_true", help="only --scaling / --evaluate-cifar")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    record: dict[str, Any] = {"bench": "knn", **environment(), "settings": vars(args)}
    for module in ("faiss", "sklearn", "lightly"):
        try:
            record[f"{module}_version"] = importlib.import_module(module).__version__
        except ImportError:
            record[f"{module}_version"] = None
    if not args.skip_comparison:
        record["comparison"] = run_comparison(args)
    if args.scaling:
        record["scaling"] = run_scaling(args)
    if args.evaluate_cifar:
        record["evaluate_cifar"] = run_evaluate_cifar(args)
    path = append_jsonl(args.out, record)
    log(f"appended one line to {path}")
    return 0
