"""Speed: reprlab vs lightly SimCLR pretraining, batched vs per-sample augmentation, feature extraction.

    python scripts/benchmark.py pretrain                 # model step, augmentation, end to end vs lightly
    python scripts/benchmark.py pretrain --ablate        # what each fast-path piece buys (model step)
    python scripts/benchmark.py pretrain --scaling       # throughput vs batch size and image size + PNG
    python scripts/benchmark.py pretrain --quality-check # kNN top-1 after a short run: fp32 vs bf16
    python scripts/benchmark.py augment                  # SimCLR views: batched vs per-sample in workers
    python scripts/benchmark.py extract                  # extract_features images/s, fp32 vs bf16

Unit for SimCLR: image pairs per second (one source image = two views). Both sides use torchvision's
resnet18 (standard 7x7/2 stem + max-pool, as lightly's examples/pytorch/simclr.py), the same augmentation
strengths (lightly's SimCLRTransform(input_size, gaussian_blur=0.0) = reprlab's SimCLR defaults), a
512-512-128 projection head with BN, NT-Xent at temperature 0.5 and SGD (lr 0.06, momentum 0.9, weight decay
5e-4). reprlab runs through its public pieces: create_encoder, build_method("simclr"), Batches,
build_optimization and, end to end, engine.fit itself. lightly (a benchmark-only extra) runs as in
../shared/bench/peer_lightly_simclr.py; without it, its rows are skipped with a message. Achieved GFLOP/s
count a training step as 3x the forward FLOPs and are compared with an sgemm measured in the same run.
Each command prints tables and appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.common import (
    REPO_ROOT,
    PeakMemory,
    append_jsonl,
    environment,
    forward_flops,
    log,
    print_table,
    sgemm_gflops,
    summarize,
    sync,
    throughput,
    tune_glibc_malloc,
)
from reprlab.config import OptimConfig
from reprlab.data.augment import SimCLRAugment
from reprlab.data.datasets import ImageSet, load_dataset
from reprlab.data.loader import Batches
from reprlab.engine import fit
from reprlab.models.encoders import create_encoder
from reprlab.optim import build_optimization
from reprlab.ssl import build_method

DEFAULT_DATA = "npz:/work/shared/data/cifar10"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results.jsonl"
LIGHTLY_MISSING = "lightly is not installed (pip install 'reprlab[bench]'): its rows are skipped"
# reprlab configurations: name -> (train.precision, train.channels_last); bf16 is the candidate CPU default
FAST = "bf16+channels_last"
CONFIGS = {"fp32": ("fp32", False), "channels_last": ("fp32", True), FAST: ("bf16", True)}
SGD = {"lr": 0.06, "momentum": 0.9, "weight_decay": 5e-4}


# --------------------------------------------------------------------------------------------- data


def load_images(spec: str, limit: int | None, seed: int, image_size: int | None = None) -> ImageSet:
    """The training images as uint8 (N, C, H, W): ``npz:<dir>`` / any reprlab dataset name, or ``random``
    (also the fallback, with a message, when an npz folder is missing). ``image_size`` resizes them once."""
    if spec.startswith("npz:") and not Path(spec[4:]).is_dir():
        log(f"{spec[4:]} not found: using random uint8 images instead")
        spec = "random"
    if spec == "random":
        n = limit or 50_000
        generator = torch.Generator().manual_seed(seed)
        data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
                        torch.randint(0, 10, (n,), generator=generator), [str(c) for c in range(10)])
    else:
        data = load_dataset(spec, val_fraction=0.0, limit=limit, seed=seed).train
    return resize_images(data, image_size)


def resize_images(data: ImageSet, size: int | None) -> ImageSet:
    """A copy at size x size (antialiased, uint8): a dataset stored at that resolution."""
    if size is None or tuple(data.images.shape[-2:]) == (size, size):
        return data
    from torchvision.transforms.v2.functional import resize

    return ImageSet(resize(data.images, [size, size], antialias=True), data.labels, data.classes)


def sample(data: ImageSet, n: int, seed: int) -> ImageSet:
    """n images drawn without replacement (with replacement when the set is smaller)."""
    generator = torch.Generator().manual_seed(seed)
    if n <= len(data):
        index = torch.randperm(len(data), generator=generator)[:n]
    else:
        index = torch.randint(0, len(data), (n,), generator=generator)
    return data.subset(index)


def nhwc_numpy(data: ImageSet) -> np.ndarray:
    """uint8 (N, H, W, C) for PIL-based pipelines."""
    return data.images.permute(0, 2, 3, 1).contiguous().numpy()


class ArrayPairs(torch.utils.data.Dataset):
    """uint8 (N, H, W, C) array -> (two views, label); the transform gets a PIL image or a uint8 tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, as_pil: bool = True,
                 two_calls: bool = False) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.as_pil, self.two_calls = as_pil, two_calls

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self.as_pil:
            from PIL import Image

            image = Image.fromarray(self.images[i])
        else:
            image = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # (C, H, W) uint8
        views = (self.transform(image), self.transform(image)) if self.two_calls else self.transform(image)
        return views, int(self.labels[i])


def loader_rate(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, warmup: int,
                steps: int, consume: Callable[[Any], Any] | None = None) -> float:
    """Source images/s of a shuffled DataLoader over ``steps`` batches (after ``warmup``), each batch passed
    to ``consume`` (e.g. a training step) when given. A fresh loader per call, as a new epoch starts."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers)
    iterator = iter(loader)
    for _ in range(warmup):
        batch = next(iterator)
        if consume is not None:
            consume(batch)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
        if consume is not None:
            consume(batch)
    rate = steps * batch_size / (time.perf_counter() - start)
    del iterator
    return rate


# --------------------------------------------------------------------------------------------- reprlab side


def encoder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"cifar_stem": True} if args.cifar_stem else {}


def build_reprlab(args: argparse.Namespace, channels_last: bool, compile_model: bool = False,
                  batch_size: int | None = None) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """SimCLR on a fresh encoder with reprlab's defaults, plus its optimizer and per-step schedule."""
    torch.manual_seed(args.seed)
    encoder = create_encoder(args.encoder, **encoder_kwargs(args))
    method = build_method("simclr", encoder, {"temperature": 0.5, "projection_dim": 128})
    if channels_last:
        method.to(memory_format=torch.channels_last)
    if compile_model:
        encoder.backbone.compile()
    optim = OptimConfig(name="sgd", schedule="cosine", **SGD)
    optimizer, scheduler = build_optimization(optim, method, batch_size or args.batch_size,
                                              steps_per_epoch=10_000, epochs=10)
    return method.to(args.device), optimizer, scheduler


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class _ReadyViews:
    """Stands in for SimCLRAugment inside SimCLR.forward and hands out pre-made views, so that the model step
    is timed through the method's own forward (encoder, projector, loss, metrics) without the augmentation."""

    def __init__(self, views: Tensor) -> None:
        self.ready = list(views.chunk(2))  # [(B, C, H, W)] * 2
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> _ReadyViews:  # as SimCLRAugment(size=..., **args)
        return self

    def views(self, images: Tensor, n: int = 2, generator: torch.Generator | None = None) -> list[Tensor]:
        self.calls += 1
        return self.ready


def reprlab_model_step(method: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, views: Tensor,
                       precision: str, device: torch.device) -> Callable[[], Tensor]:
    """One optimizer step on ready views (2B, C, H, W): SimCLR.forward with the augmentation swapped out,
    then engine.fit's zero_grad / backward / step / schedule sequence (no host sync)."""
    from unittest import mock

    import reprlab.ssl.simclr as simclr_module

    ready = _ReadyViews(views)
    batch = {"images": torch.zeros(views.shape[0] // 2, *views.shape[1:], dtype=torch.uint8, device=device)}

    def step() -> Tensor:
        with mock.patch.object(simclr_module, "SimCLRAugment", ready), autocast(device, precision):
            loss = method(batch)["loss"]
        if not ready.calls:
            raise RuntimeError("SimCLR.forward no longer builds SimCLRAugment: update reprlab_model_step "
                               "so that the model step is timed without augmentation")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.detach()

    return step


def reprlab_augment(method: nn.Module, image_size: int) -> SimCLRAugment:
    """The augmentation SimCLR.forward builds (same arguments)."""
    return SimCLRAugment(size=image_size, **method.augment_args)


def make_views(data: ImageSet, batch_size: int, image_size: int, device: torch.device, seed: int) -> Tensor:
    """(2B, C, S, S) float views of one real batch, made by reprlab's SimCLR augmentation."""
    images = sample(data, batch_size, seed).images.to(device)
    augment = SimCLRAugment(size=image_size)
    return torch.cat(augment.views(images, n=2, generator=torch.Generator().manual_seed(seed)))


def reprlab_e2e(args: argparse.Namespace, data: ImageSet, config: str, batch_size: int, steps: int,
                warmup: int, repeats: int, compile_model: bool = False) -> tuple[dict, dict]:
    """Pairs/s of engine.fit itself (uint8 batches -> device -> views -> step), one fit per timed block."""
    precision, channels_last = CONFIGS[config]
    device = torch.device(args.device)
    # newer engines also take the images to channels_last themselves
    takes_channels_last = "channels_last" in inspect.signature(fit).parameters
    fit_options = {"channels_last": channels_last} if takes_channels_last else {}
    with PeakMemory(device) as memory:
        method, optimizer, scheduler = build_reprlab(args, channels_last, compile_model, batch_size)

        def run(n_steps: int, seed: int) -> float:
            batches = Batches(sample(data, n_steps * batch_size, seed), batch_size, seed=seed)
            start = time.perf_counter()
            fit(method, batches, optimizer, scheduler, epochs=1, device=device, precision=precision,
                resume=False, progress=False, log_every=args.log_every, **fit_options)
            sync(device)
            return n_steps * batch_size / (time.perf_counter() - start)

        if warmup:
            run(warmup, seed=10_000)
        rates = [run(steps, seed=r) for r in range(repeats)]
    return summarize(rates), memory.as_dict()


# --------------------------------------------------------------------------------------------- lightly side


def lightly_available() -> bool:
    return importlib.util.find_spec("lightly") is not None


def build_lightly(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """As lightly's examples/pytorch/simclr.py: torchvision resnet18 (fc removed) + SimCLRProjectionHead."""
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    class LightlySimCLR(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            resnet = torchvision.models.resnet18()
            if args.cifar_stem:
                resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
                resnet.maxpool = nn.Identity()
            resnet.fc = nn.Identity()
            self.backbone = resnet
            self.projection_head = SimCLRProjectionHead(512, 512, 128)

        def forward(self, x: Tensor) -> Tensor:
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

    torch.manual_seed(args.seed)
    model = LightlySimCLR().to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    return model, NTXentLoss(), optimizer


def lightly_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    """lightly's training step: two forward passes, NT-Xent, backward, SGD step."""

    def step(x0: Tensor, x1: Tensor) -> Tensor:
        x0, x1 = x0.to(device, non_blocking=True), x1.to(device, non_blocking=True)
        loss = criterion(model(x0), model(x1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


def lightly_dataset(data: ImageSet, image_size: int) -> torch.utils.data.Dataset:
    from lightly.transforms import SimCLRTransform

    transform = SimCLRTransform(input_size=image_size, gaussian_blur=0.0)
    return ArrayPairs(nhwc_numpy(data), data.labels.numpy(), transform)


def lightly_e2e(args: argparse.Namespace, dataset: torch.utils.data.Dataset, batch_size: int, workers: int,
                steps: int, warmup: int, repeats: int) -> tuple[dict, dict]:
    device = torch.device(args.device)
    with PeakMemory(device) as memory:
        model, criterion, optimizer = build_lightly(args)
        model.train()
        step = lightly_step(model, criterion, optimizer, device)

        def consume(batch: Any) -> None:
            (x0, x1), _ = batch
            step(x0, x1)

        rates = [loader_rate(dataset, batch_size, workers, warmup, steps, consume) for _ in range(repeats)]
    return summarize(rates), memory.as_dict()


# --------------------------------------------------------------------------------------------- pretrain


def training_gflops(pairs_per_s: float, forward_flops_per_image: float) -> float:
    """Achieved GFLOP/s: two views per pair, a training step = 3x the forward FLOPs."""
    return pairs_per_s * 2 * 3 * forward_flops_per_image / 1e9


def model_flops(args: argparse.Namespace, image_size: int) -> float:
    method, _, _ = build_reprlab(args, channels_last=False)
    return forward_flops(nn.Sequential(method.encoder, method.projector).cpu(),
                         torch.rand(4, 3, image_size, image_size))


def run_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    size, batch = args.image_size, args.batch_size
    data = load_images(args.data, args.limit, args.seed, size)
    log(f"data: {len(data)} images {tuple(data.images.shape[1:])}")
    peak = {"fp32": sgemm_gflops(device=device), "bf16": sgemm_gflops(dtype=torch.bfloat16, device=device)}
    flops = model_flops(args, size)
    log(f"sgemm fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f}; "
        f"forward {flops / 1e6:.1f} MFLOP/image")
    timing = {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats}
    views = make_views(data, batch, size, device, args.seed)  # (2B, C, S, S)
    results: list[dict[str, Any]] = []

    def add(framework: str, config: str, part: str, stats: dict, memory: dict | None = None,
            gemm: str | None = None) -> None:
        row = {"framework": framework, "config": config, "part": part, "pairs_per_s": stats["median"],
               "runs": stats["runs"]}
        if gemm is not None:
            row["gflops"] = training_gflops(stats["median"], flops)
            row["sgemm_fraction"] = row["gflops"] / peak[gemm]
        if memory is not None:
            row["peak_mb"], row["delta_mb"] = memory["peak_mb"], memory["delta_mb"]
        results.append(row)
        log(f"{framework} {config} {part}: {stats['median']:.1f} pairs/s")

    # lightly first, so process-wide state left by reprlab's runs (allocator heap, kernels) cannot help it
    if args.lightly and lightly_available():
        dataset = lightly_dataset(data, size)
        for workers in args.workers:
            rates = [loader_rate(dataset, batch, workers, args.warmup, args.steps)
                     for _ in range(args.repeats)]
            add("lightly", f"workers={workers}", "augment", summarize(rates))
        model, criterion, optimizer = build_lightly(args)
        step = lightly_step(model, criterion, optimizer, device)
        x0, x1 = views.chunk(2)
        add("lightly", "fp32", "model", throughput(lambda: step(x0, x1), batch, device=device, **timing),
            gemm="fp32")
        for workers in args.workers:
            stats, memory = lightly_e2e(args, dataset, batch, workers, args.steps, args.warmup, args.repeats)
            add("lightly", f"workers={workers}", "e2e", stats, memory, gemm="fp32")
    elif args.lightly:
        log(LIGHTLY_MISSING)

    # reprlab: augmentation alone (uint8 batch on the device -> two views), model step alone, end to end
    method, _, _ = build_reprlab(args, channels_last=False)
    augment = reprlab_augment(method, size)
    batches = Batches(data, batch, seed=args.seed)
    stream = iter(_cycle(batches))
    add("reprlab", "any", "augment", throughput(lambda: augment.views(next(stream)["images"].to(device)),
                                                 batch, device=device, **timing))
    for config in args.configs:
        precision, channels_last = CONFIGS[config]
        method, optimizer, scheduler = build_reprlab(args, channels_last)
        step = reprlab_model_step(method, optimizer, scheduler, views, precision, device)
        add("reprlab", config, "model", throughput(step, batch, device=device, **timing), gemm=precision)
        stats, memory = reprlab_e2e(args, data, config, batch, args.steps, args.warmup, args.repeats)
        add("reprlab", config, "e2e", stats, memory, gemm=precision)

    for config in args.configs if args.compile else ():
        log(f"compiling {config} (minutes on a small CPU) ...")
        stats, memory = reprlab_e2e(args, data, config, batch, args.steps, args.warmup + 2, args.repeats,
                                    compile_model=True)
        add("reprlab", f"{config}+compile", "e2e", stats, memory, gemm=CONFIGS[config][0])

    ratios = pretrain_ratios(results)
    ablation = run_ablation(args, data, views, peak) if args.ablate else None
    results.sort(key=lambda row: row["framework"] != "reprlab")  # stable: reprlab rows first
    print_table(results, ["framework", "config", "part", "pairs_per_s", "gflops", "sgemm_fraction", "peak_mb",
                          "delta_mb"],
                title=f"SimCLR pretraining, batch {batch}, {size} px, {args.encoder} "
                      "(pairs/s = source images/s)")
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"],
                title="reprlab / lightly (best lightly setting)")
    print(f"sgemm: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s; "
          f"forward {flops / 1e6:.1f} MFLOP per image (x3 per training step)")
    return {"bench": "pretrain", "env": environment(), "args": vars(args), "sgemm_gflops": peak,
            "forward_mflops_per_image": flops / 1e6, "results": results, "ratios": ratios,
            "ablation": ablation}


def _cycle(batches: Batches):
    epoch = 0
    while True:
        yield from batches.epoch(epoch)
        epoch += 1


def _best(results: list[dict], framework: str, part: str, config: str | None = None) -> float | None:
    rates = [r["pairs_per_s"] for r in results if r["framework"] == framework and r["part"] == part
             and (config is None or r["config"] == config)]
    return max(rates) if rates else None


def pretrain_ratios(results: list[dict]) -> dict[str, float]:
    """reprlab / lightly per part; lightly's best setting (usually 2 workers) is the reference."""
    ratios = {}
    for part in ("augment", "model", "e2e"):
        reference = _best(results, "lightly", part)
        for config in [*CONFIGS, *(f"{c}+compile" for c in CONFIGS)]:
            ours = _best(results, "reprlab", part, config)
            if ours is not None and reference:
                ratios[f"{part} {config}"] = ours / reference
    return ratios


# --------------------------------------------------------------------------------------------- ablation


def run_ablation(args: argparse.Namespace, data: ImageSet, views: Tensor, peak: dict) -> list[dict]:
    """Model-step pairs/s for each fast-path piece alone and together, and the augmentation under autocast.

    The optimizer variants replace build_optimization's SGD by torch's foreach / fused SGD (same maths)."""
    device = torch.device(args.device)
    timing = {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats}
    views_cl = views.contiguous(memory_format=torch.channels_last)
    variants = [  # (name, precision, model channels_last, views channels_last, optimizer)
        ("fp32", "fp32", False, False, None),
        ("fp32 + channels_last model", "fp32", True, False, None),
        ("fp32 + channels_last model and views", "fp32", True, True, None),
        ("bf16", "bf16", False, False, None),
        ("bf16 + channels_last model", "bf16", True, False, None),
        ("bf16 + channels_last model and views", "bf16", True, True, None),
        ("bf16 + channels_last + foreach SGD", "bf16", True, True, "foreach"),
        ("bf16 + channels_last + fused SGD", "bf16", True, True, "fused"),
    ]
    flops = model_flops(args, args.image_size)
    rows = []
    for name, precision, model_cl, views_are_cl, optimizer_kind in variants:
        method, optimizer, scheduler = build_reprlab(args, model_cl)
        if optimizer_kind is not None:
            groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                      for g in optimizer.param_groups]
            optimizer = torch.optim.SGD(groups, lr=SGD["lr"], momentum=SGD["momentum"],
                                        **{optimizer_kind: True})
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        inputs = views_cl if views_are_cl else views
        step = reprlab_model_step(method, optimizer, scheduler, inputs, precision, device)
        try:
            stats = throughput(step, args.batch_size, device=device, **timing)
        except RuntimeError as error:  # e.g. fused SGD without a kernel for this device
            log(f"ablation {name}: {error}")
            continue
        rows.append({"variant": name, "pairs_per_s": stats["median"], "runs": stats["runs"],
                     "gflops": training_gflops(stats["median"], flops)})
        log(f"ablation {name}: {stats['median']:.1f} pairs/s")
    base = rows[0]["pairs_per_s"] if rows else float("nan")
    for row in rows:
        row["speedup"] = row["pairs_per_s"] / base

    # augmentation: plain fp32 (the model-step-alone setting) vs under bf16 autocast (as engine.fit runs it)
    augment = SimCLRAugment(size=args.image_size)
    images = sample(data, args.batch_size, args.seed).images.to(device)
    augment_variants = (("augment fp32", "fp32", False), ("augment under bf16 autocast", "bf16", False),
                        ("augment fp32 + channels_last copy", "fp32", True))
    for name, precision, to_cl in augment_variants:
        def make(precision: str = precision, to_cl: bool = to_cl) -> None:
            with autocast(device, precision):
                out = augment.views(images, n=2)
            if to_cl:
                [v.contiguous(memory_format=torch.channels_last) for v in out]

        stats = throughput(make, args.batch_size, device=device, **timing)
        rows.append({"variant": name, "pairs_per_s": stats["median"], "runs": stats["runs"]})
    print_table(rows, ["variant", "pairs_per_s", "speedup", "gflops"],
                title=f"ablation: model step alone, batch {args.batch_size}, {args.image_size} px")
    return rows


# --------------------------------------------------------------------------------------------- scaling


def run_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """End-to-end pairs/s against batch size (at --image-size) and image size (at --batch-size), + a PNG."""
    base = load_images(args.data, args.limit, args.seed)
    with_lightly = args.lightly and lightly_available()
    if args.lightly and not with_lightly:
        log(LIGHTLY_MISSING)
    points = [("batch_size", b, args.image_size) for b in args.scaling_batch_sizes]
    points += [("image_size", args.batch_size, s) for s in args.scaling_image_sizes]
    rows = []
    steps, warmup, repeats = args.scaling_steps, 1, args.scaling_repeats
    for axis, batch, size in points:
        need = (warmup + steps) * batch
        data = resize_images(sample(base, need, args.seed), size)
        for config in args.configs:
            stats, memory = reprlab_e2e(args, data, config, batch, steps, warmup, repeats)
            rows.append({"axis": axis, "batch_size": batch, "image_size": size, "series": f"reprlab {config}",
                         "pairs_per_s": stats["median"], "peak_mb": memory["peak_mb"]})
            log(f"scaling {axis} B={batch} S={size} reprlab {config}: {stats['median']:.1f} pairs/s")
        if with_lightly:
            workers = args.workers[0]
            dataset = lightly_dataset(data, size)
            stats, memory = lightly_e2e(args, dataset, batch, workers, steps, warmup, repeats)
            rows.append({"axis": axis, "batch_size": batch, "image_size": size,
                         "series": f"lightly workers={workers}", "pairs_per_s": stats["median"],
                         "peak_mb": memory["peak_mb"]})
            log(f"scaling {axis} B={batch} S={size} lightly: {stats['median']:.1f} pairs/s")
    print_table(rows, ["axis", "batch_size", "image_size", "series", "pairs_per_s", "peak_mb"],
                title="SimCLR end-to-end scaling (pairs/s)")
    plot = plot_scaling(rows, Path(args.plot))
    print(f"plot: {plot}")
    return {"bench": "pretrain_scaling", "env": environment(), "args": vars(args), "results": rows,
            "plot": str(plot)}


def plot_scaling(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (axis, label) in zip(axes, (("batch_size", "batch size"), ("image_size", "image size (px)"))):
        for series in dict.fromkeys(r["series"] for r in rows):
            points = sorted((r[axis], r["pairs_per_s"]) for r in rows
                            if r["axis"] == axis and r["series"] == series)
            if points:
                ax.plot(*zip(*points), marker="o", label=series)
        ax.set_xlabel(label)
        ax.set_ylabel("image pairs / s (end to end)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r[axis] for r in rows if r["axis"] == axis})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"SimCLR throughput, {torch.get_num_threads()} torch thread(s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- quality check


def run_quality_check(args: argparse.Namespace) -> dict[str, Any]:
    """Two short pretraining runs through reprlab.stages.pretrain (same seed, same data order and augmentation
    draws): fp32 vs bf16 autocast + channels_last, then kNN top-1 (fp32 features) on the held-out 10%."""
    from reprlab.config import DataConfig, EncoderConfig, MonitorConfig, PretrainConfig, TrainConfig
    from reprlab.stages.pretrain import pretrain

    if args.data == "random":
        raise SystemExit("--quality-check needs labeled images: pass --data npz:<dir> or a dataset name")
    out_dir = Path(args.quality_dir or tempfile.mkdtemp(prefix="reprlab-quality-"))
    rows = []
    for seed in args.quality_seeds:
        for config in ("fp32", FAST):
            precision, channels_last = CONFIGS[config]
            cfg = PretrainConfig(
                name=f"quality_{config}_seed{seed}", out_dir=str(out_dir),
                data=DataConfig(name=args.data, limit=args.quality_images, val_fraction=0.1),
                encoder=EncoderConfig(name=args.encoder, kwargs=encoder_kwargs(args)),
                optim=OptimConfig(name="sgd", schedule="cosine", **SGD),
                train=TrainConfig(epochs=args.quality_epochs, batch_size=args.batch_size, device=args.device,
                                  precision=precision, channels_last=channels_last, seed=seed, progress=False,
                                  resume=False, log_every=args.log_every),
                monitor=MonitorConfig(every_epochs=args.quality_epochs, knn_k=20, knn_temperature=0.07),
            )
            start = time.perf_counter()
            run_dir = pretrain(cfg)
            seconds = time.perf_counter() - start
            ends = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
            ends = [r for r in ends if r.get("event") == "epoch_end"]
            rows.append({"config": config, "precision": precision, "channels_last": channels_last,
                         "seed": seed, "knn_top1": ends[-1].get("knn_top1"), "final_loss": ends[-1]["loss"],
                         "seconds": seconds})
            log(f"quality {config} seed {seed}: knn top-1 {rows[-1]['knn_top1']}, {seconds:.0f} s")
    mean = {c: statistics.mean(r["knn_top1"] for r in rows if r["config"] == c) for c in ("fp32", FAST)}
    print_table(rows, ["config", "precision", "channels_last", "seed", "knn_top1", "final_loss", "seconds"],
                title=f"bf16 quality check: {args.quality_epochs} epoch(s) on {args.quality_images} images")
    difference = mean[FAST] - mean["fp32"]
    print(f"kNN top-1 fp32 {mean['fp32']:.4f}, {FAST} {mean[FAST]:.4f} "
          f"(difference {difference:+.4f}; single short runs differ by about a point from seed noise alone)")
    return {"bench": "pretrain_quality", "env": environment(), "args": vars(args), "results": rows,
            "knn_top1_mean": mean, "difference": difference, "runs_dir": str(out_dir)}


# --------------------------------------------------------------------------------------------- augment


def torchvision_simclr_transform(size: int, tensor_input: bool) -> Callable:
    """The usual per-sample SimCLR pipeline from torchvision transforms (PIL v1, or v2 on uint8 tensors)."""
    if tensor_input:
        from torchvision.transforms import v2

        return v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(p=0.2),
            v2.ToDtype(torch.float32, scale=True),
        ])
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        transforms.RandomGrayscale(p=0.2), transforms.ToTensor(),
    ])


def run_augment(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    size, batch = args.image_size, args.batch_size
    data = load_images(args.data, args.limit, args.seed, size)
    timing = {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats}
    rows = []
    augment = SimCLRAugment(size=size)
    stream = iter(_cycle(Batches(data, batch, seed=args.seed)))
    stats = throughput(lambda: augment.views(next(stream)["images"].to(device), n=2), batch, device=device,
                       **timing)
    rows.append({"pipeline": "reprlab SimCLRAugment, batched", "where": str(device),
                 "pairs_per_s": stats["median"], "runs": stats["runs"]})
    log(f"reprlab batched: {stats['median']:.0f} pairs/s")

    images, labels = nhwc_numpy(data), data.labels.numpy()
    pil = torchvision_simclr_transform(size, tensor_input=False)
    tensor = torchvision_simclr_transform(size, tensor_input=True)
    pipelines = [
        ("torchvision transforms (PIL), per sample", ArrayPairs(images, labels, pil, True, two_calls=True)),
        ("torchvision transforms.v2 (uint8 tensor), per sample",
         ArrayPairs(images, labels, tensor, as_pil=False, two_calls=True)),
    ]
    if args.lightly and lightly_available():
        pipelines.append(("lightly SimCLRTransform (PIL), per sample", lightly_dataset(data, size)))
    elif args.lightly:
        log(LIGHTLY_MISSING)
    for name, dataset in pipelines:
        for workers in args.workers:
            rates = [loader_rate(dataset, batch, workers, args.warmup, args.steps)
                     for _ in range(args.repeats)]
            stats = summarize(rates)
            rows.append({"pipeline": name, "where": f"DataLoader, {workers} workers",
                         "pairs_per_s": stats["median"], "runs": stats["runs"]})
            log(f"{name} workers={workers}: {stats['median']:.0f} pairs/s")
    ours = rows[0]["pairs_per_s"]
    for row in rows:
        row["reprlab_ratio"] = ours / row["pairs_per_s"]
    ratios = {f"reprlab / {r['pipeline']} ({r['where']})": r["reprlab_ratio"] for r in rows[1:]}
    print_table(rows, ["pipeline", "where", "pairs_per_s", "reprlab_ratio"],
                title=f"SimCLR augmentation, two views per image, batch {batch}, {size} px")
    streamed = measure_folder_stream(args) if args.folder else None
    return {"bench": "augment", "env": environment(), "args": vars(args), "results": rows, "ratios": ratios,
            "folder_stream": streamed}


def measure_folder_stream(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s that FolderBatches delivers from image files (decode + resize in workers, uint8 batches):
    the rate at which a folder too large for memory can feed the device-side augmentation."""
    from reprlab.data.stream import FolderBatches

    rows = []
    for workers in args.workers:
        batches = FolderBatches(args.folder, image_size=args.image_size, batch_size=args.batch_size,
                                num_workers=workers, drop_last=False, seed=args.seed)

        def block(batches: FolderBatches = batches) -> float:
            count, start, stream = 0, 0.0, _cycle(batches)
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    start = time.perf_counter()
                images = next(stream)["images"]
                count += len(images) if step >= args.warmup else 0
            stream.close()
            return count / (time.perf_counter() - start)

        stats = summarize([block() for _ in range(args.repeats)])
        rows.append({"pipeline": "reprlab FolderBatches (decode + resize)", "where": f"{workers} workers",
                     "images_per_s": stats["median"], "runs": stats["runs"]})
        log(f"FolderBatches workers={workers}: {stats['median']:.0f} images/s")
    print_table(rows, ["pipeline", "where", "images_per_s"],
                title=f"streaming {len(batches.files)} files from {args.folder} at {args.image_size} px")
    return rows


# --------------------------------------------------------------------------------------------- extract


def run_extract(args: argparse.Namespace) -> dict[str, Any]:
    from reprlab.evaluate.features import extract_features

    device = torch.device(args.device)
    size = args.image_size
    data = load_images(args.data, args.extract_images, args.seed, size)
    images = data.images
    peak = {"fp32": sgemm_gflops(device=device), "bf16": sgemm_gflops(dtype=torch.bfloat16, device=device)}
    torch.manual_seed(args.seed)
    encoder = create_encoder(args.encoder, **encoder_kwargs(args))
    flops = forward_flops(encoder, torch.rand(4, 3, size, size))
    rows = []
    for name, precision, channels_last in (("fp32", "fp32", False), ("fp32 + channels_last", "fp32", True),
                                           ("bf16", "bf16", False), ("bf16 + channels_last", "bf16", True)):
        encoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

        def block(precision: str = precision) -> float:
            start = time.perf_counter()
            extract_features(encoder, images, batch_size=args.extract_batch_size, device=device,
                             precision=precision)
            return len(images) / (time.perf_counter() - start)

        block()  # warm-up: allocator, kernel choice
        stats = summarize([block() for _ in range(args.repeats)])
        gflops = stats["median"] * flops / 1e9
        rows.append({"config": name, "images_per_s": stats["median"], "runs": stats["runs"], "gflops": gflops,
                     "sgemm_fraction": gflops / peak[precision]})
        log(f"extract {name}: {stats['median']:.0f} images/s")
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
    print_table(rows, ["config", "images_per_s", "speedup", "gflops", "sgemm_fraction"],
                title=f"extract_features, {len(images)} images, {size} px, batch {args.extract_batch_size}, "
                      f"{args.encoder}")
    print(f"sgemm: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f}; "
          f"forward {flops / 1e6:.1f} MFLOP/image")
    return {"bench": "extract", "env": environment(), "args": vars(args), "sgemm_gflops": peak,
            "forward_mflops_per_image": flops / 1e6, "results": rows}


# --------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=DEFAULT_DATA,
                        help="npz:<dir>, another reprlab dataset name, or 'random' (default: %(default)s; "
                             "random images when the folder is missing)")
    common.add_argument("--limit", type=int, default=None, help="use only this many training images")
    common.add_argument("--batch-size", type=int, default=256)
    common.add_argument("--image-size", type=int, default=32)
    common.add_argument("--encoder", default="resnet18", help="reprlab encoder name (lightly side: resnet18)")
    common.add_argument("--cifar-stem", action="store_true", help="3x3/1 stem without max-pool on both sides")
    common.add_argument("--warmup", type=int, default=3)
    common.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    common.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    common.add_argument("--workers", type=int, nargs="+", default=[2, 0], help="DataLoader workers (peers)")
    common.add_argument("--no-lightly", dest="lightly", action="store_false", help="skip the lightly rows")
    common.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    common.add_argument("--device", default="cpu")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--log-every", type=int, default=20, help="engine.fit's steps between host syncs")
    common.add_argument("--out", default=str(DEFAULT_OUT), help="JSON-lines file to append to")
    common.add_argument("--tune-malloc", action="store_true",
                        help="raise glibc's mmap/trim thresholds first (applies to every row; recorded)")

    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pretrain = sub.add_parser("pretrain", parents=[common], help="SimCLR pretraining vs lightly")
    pretrain.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                          help="reprlab configurations (train.precision + train.channels_last)")
    pretrain.add_argument("--compile", action="store_true",
                          help="also time each --configs entry with torch.compile, end to end")
    pretrain.add_argument("--ablate", action="store_true", help="model step with each fast-path piece")
    pretrain.add_argument("--scaling", action="store_true", help="throughput vs batch size and image size")
    pretrain.add_argument("--scaling-batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    pretrain.add_argument("--scaling-image-sizes", type=int, nargs="+", default=[32, 64, 96])
    pretrain.add_argument("--scaling-steps", type=int, default=5)
    pretrain.add_argument("--scaling-repeats", type=int, default=1)
    pretrain.add_argument("--plot", default=str(REPO_ROOT / "benchmarks" / "pretrain_scaling.png"))
    pretrain.add_argument("--quality-check", action="store_true", help="kNN after short fp32 and bf16 runs")
    pretrain.add_argument("--quality-images", type=int, default=10_000)
    pretrain.add_argument("--quality-epochs", type=int, default=2)
    pretrain.add_argument("--quality-seeds", type=int, nargs="+", default=[0])
    pretrain.add_argument("--quality-dir", default=None, help="where the runs go (default: a temp folder)")
    augment = sub.add_parser("augment", parents=[common], help="batched vs per-sample SimCLR augmentation")
    augment.add_argument("--folder", default=None,
                         help="also time FolderBatches streaming this image folder (decode + resize)")
    extract = sub.add_parser("extract", parents=[common], help="feature extraction images/s")
    extract.add_argument("--extract-images", type=int, default=10_000)
    extract.add_argument("--extract-batch-size", type=int, default=512)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.tune_malloc and not tune_glibc_malloc():
        log("--tune-malloc: not a glibc system, nothing changed")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.command == "pretrain":
        run = run_scaling if args.scaling else run_quality_check if args.quality_check else run_pretrain
    else:
        run = {"augment": run_augment, "extract": run_extract}[args.command]
    record = run(args)
    path = append_jsonl(args.out, _finite(record))
    log(f"appended one line to {path}")
    return 0


def _finite(value: Any) -> Any:
    """NaN / inf -> None, so the line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
