"""The setting the speed benchmarks (pretrain, augment, extract) share: options, images, both sides.

Unit: image pairs per second (one source image = two views). Both sides use torchvision's resnet18 (standard
7x7/2 stem + max-pool, as lightly's examples/pytorch/simclr.py), the same augmentation strengths (lightly's
SimCLRTransform with reprlab's default pipeline, no blur), a 512-512-128 projection head with BN, NT-Xent at
temperature 0.5 and SGD (lr 0.06, momentum 0.9, weight decay 5e-4). reprlab runs through its public pieces, as
the pretraining stage does: create_encoder, build_method("simclr"), Batches, build_optimization, and engine.fit
itself end to end; its model step alone is ``method.forward_views`` on views made beforehand by the method's own
pipeline (``method.augment``). lightly (a benchmark-only extra) runs through bench.peers; without it, its rows
are skipped with a message. Achieved GFLOP/s count a training step as 3x the forward FLOPs and are compared
with an sgemm measured in the same run.

BYOL and DINO (``method`` arguments; the pretrain benchmark's ``--method``) are timed the same way: reprlab's
method with the heads, momentum and view pipelines of ``configs/pretrain/<method>_cifar10.yaml`` (DINO: its two
32 px global and two 16 px local crops), the same SGD; lightly's twin of it (bench.peer_methods: its heads, loss,
momentum updates and per-sample transform with the same settings) on torchvision's resnet18. The model step
alone includes the momentum update on both sides (``after_step`` / lightly's ``update_momentum``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench import peer_methods, peer_parts, peers
from bench.common import REPO_ROOT, PeakMemory, append_jsonl, forward_flops, log, summarize, sync, tune_glibc_malloc
from reprlab.config import OptimConfig, PretrainConfig, load_config
from reprlab.cpu_bf16_convs import guard_cpu_bf16_convs
from reprlab.data.datasets import ImageSet, load_dataset
from reprlab.data.loader import Batches
from reprlab.data.views import ViewAugment
from reprlab.engine import FitOptions, fit
from reprlab.hardware import resolve_numerics
from reprlab.models.encoders import create_encoder
from reprlab.optim import build_optimization
from reprlab.ssl import build_method

DEFAULT_DATA = "npz:/work/shared/data/cifar10"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results.jsonl"
# reprlab configurations: name -> (train.precision, train.channels_last); auto is every stage's default, which
# resolves to FAST on a processor with native bf16 and to fp32 elsewhere (reprlab.hardware.resolve_numerics)
FAST = "bf16+channels_last"
CONFIGS = {"auto": ("auto", False), "fp32": ("fp32", False), "channels_last": ("fp32", True), FAST: ("bf16", True)}
SGD = {"lr": 0.06, "momentum": 0.9, "weight_decay": 5e-4}
METHODS = ("simclr", "byol", "dino")  # timed methods: SimCLR at the settings above, the others at their configs
HORIZON = 100_000  # the momentum schedules' total steps in the timed steps (a long run's start)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every speed benchmark takes."""
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="npz:<dir>, another reprlab dataset name, or 'random' (default: %(default)s; "
                             "random images when the folder is missing)")
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--encoder", default="resnet18", help="reprlab encoder name (lightly side: resnet18)")
    parser.add_argument("--cifar-stem", action="store_true", help="3x3/1 stem without max-pool on both sides")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 0], help="DataLoader workers (peers)")
    parser.add_argument("--no-lightly", dest="lightly", action="store_false", help="skip the lightly rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20, help="engine.fit's steps between host syncs")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON-lines file to append to")
    parser.add_argument("--tune-malloc", action="store_true",
                        help="raise glibc's mmap/trim thresholds first (applies to every row; recorded)")


def run_and_record(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Apply the process-wide options, run the benchmark, append its record to ``--out``."""
    if args.tune_malloc and not tune_glibc_malloc():
        log("--tune-malloc: not a glibc system, nothing changed")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    record = run(args)
    log(f"appended one line to {append_jsonl(args.out, record)}")
    return 0


def timing(args: argparse.Namespace) -> dict[str, int]:
    """The ``throughput`` keywords of the options."""
    return {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats}


# --------------------------------------------------------------------------------------------- images


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


def endless(batches: Batches) -> Iterator[dict[str, Tensor]]:
    """Batches epoch after epoch, for timing loops longer than an epoch."""
    epoch = 0
    while True:
        yield from batches.epoch(epoch)
        epoch += 1


# --------------------------------------------------------------------------------------------- reprlab side


def encoder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"cifar_stem": True} if args.cifar_stem else {}


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def method_params(method: str) -> dict[str, Any]:
    """SimCLR: temperature 0.5, 128-d projection (the setting above); another method: its CIFAR-10 config's."""
    if method == "simclr":
        return {"temperature": 0.5, "projection_dim": 128}
    if method not in METHODS:
        raise ValueError(f"no speed setting for method {method!r}; choose from {list(METHODS)}")
    path = REPO_ROOT / "configs" / "pretrain" / f"{method}_cifar10.yaml"
    return dict(load_config(PretrainConfig, path).method.params)


def resolved(config: str, device: torch.device, model: nn.Module) -> tuple[str, bool]:
    """(precision, channels_last) that a --configs entry runs ``model`` with on ``device`` (``auto`` resolved as
    engine.fit resolves ``train.precision: auto``)."""
    numerics = resolve_numerics(*CONFIGS[config], device, model)
    return numerics.precision, numerics.channels_last


def build_reprlab(args: argparse.Namespace, channels_last: bool = False, compile_model: bool = False,
                  batch_size: int | None = None,
                  method_name: str = "simclr") -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """``method_name`` (SimCLR by default) on a fresh encoder with :func:`method_params`, plus its optimizer and
    per-step schedule."""
    torch.manual_seed(args.seed)
    encoder = create_encoder(args.encoder, **encoder_kwargs(args))
    method = build_method(method_name, encoder, method_params(method_name))
    if channels_last:
        method.to(memory_format=torch.channels_last)
    if compile_model:
        encoder.backbone.compile()
    optim = OptimConfig(name="sgd", schedule="cosine", **SGD)
    optimizer, scheduler = build_optimization(optim, method, batch_size or args.batch_size,
                                              steps_per_epoch=10_000, epochs=10)
    return method.to(args.device), optimizer, scheduler


def make_views(augment: ViewAugment, data: ImageSet, batch_size: int, device: torch.device, seed: int) -> list[Tensor]:
    """Two float views (B, C, S, S) of one real batch, made by ``augment`` (a method's pipeline)."""
    images = sample(data, batch_size, seed).images.to(device)
    return augment.views(images, n=2, generator=torch.Generator().manual_seed(seed))


def method_views(method: nn.Module, data: ImageSet, batch_size: int, device: torch.device, seed: int) -> list[Tensor]:
    """The float views of one real batch that ``method`` makes itself (``method.views``), drawn from ``seed``."""
    images = sample(data, batch_size, seed).images.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return method.views(images)


def model_step(method: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, views: list[Tensor],
               precision: str, device: torch.device) -> Callable[[], Tensor]:
    """One optimizer step on ready views: ``method.forward_views`` (encoder, projector, loss, metrics) under
    engine.fit's autocast, then its zero_grad / backward / step / schedule / ``after_step`` sequence (the
    momentum update of BYOL and DINO; nothing for SimCLR), no host sync; bf16 on a CPU with the engine's
    convolution guard, so the step is the one training runs."""
    guard_cpu_bf16_convs(method, precision, device)  # lives as long as ``method``, which only this step uses
    done = [0]

    def step() -> Tensor:
        with autocast(device, precision):
            loss = method.forward_views(views)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        done[0] += 1
        method.after_step(done[0], HORIZON)
        return loss.detach()

    return step


def reprlab_e2e(args: argparse.Namespace, data: ImageSet, config: str, batch_size: int, steps: int,
                warmup: int, repeats: int, compile_model: bool = False,
                method_name: str = "simclr") -> tuple[dict, dict]:
    """Pairs/s of engine.fit itself (uint8 batches -> device -> views -> step), one fit per timed block; the
    configuration goes to fit as configured, so ``auto`` is resolved by the engine as in a real run."""
    precision, channels_last = CONFIGS[config]
    device = torch.device(args.device)
    options = FitOptions(epochs=1, device=device, precision=precision, channels_last=channels_last,
                         resume=False, progress=False, log_every=args.log_every)
    with PeakMemory(device) as memory:
        method, optimizer, scheduler = build_reprlab(args, channels_last, compile_model, batch_size, method_name)

        def run(n_steps: int, seed: int) -> float:
            batches = Batches(sample(data, n_steps * batch_size, seed), batch_size, seed=seed)
            start = time.perf_counter()
            fit(method, batches, optimizer, scheduler, options)
            sync(device)
            return n_steps * batch_size / (time.perf_counter() - start)

        if warmup:
            run(warmup, seed=10_000)
        rates = [run(steps, seed=r) for r in range(repeats)]
    return summarize(rates), memory.as_dict()


def model_flops(args: argparse.Namespace, image_size: int) -> float:
    """Forward FLOPs per image of encoder + projector."""
    method, _, _ = build_reprlab(args)
    return forward_flops(nn.Sequential(method.encoder, method.projector).cpu(),
                         torch.rand(4, 3, image_size, image_size))


def training_gflops(pairs_per_s: float, forward_flops_per_image: float) -> float:
    """Achieved GFLOP/s: two views per pair, a training step = 3x the forward FLOPs."""
    return pairs_per_s * 2 * 3 * forward_flops_per_image / 1e9


# --------------------------------------------------------------------------------------------- lightly side


def build_lightly(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """As lightly's examples/pytorch/simclr.py: torchvision resnet18 + SimCLRProjectionHead(512, 512, 128)."""
    torch.manual_seed(args.seed)
    model, criterion = peers.build_lightly_simclr(peers.torchvision_resnet18(args.cifar_stem), 512, 512, 128)
    model = model.to(args.device)
    return model, criterion, torch.optim.SGD(model.parameters(), **SGD)


def build_lightly_twin(args: argparse.Namespace, method_name: str) -> peers.LightlyTwin:
    """lightly's twin of ``method_name`` (bench.peer_methods) on torchvision's resnet18, with the settings of
    reprlab's method from :func:`method_params` (its transform ImageNet-normalized: torchvision's resnet)."""
    params = method_params(method_name)
    with torch.random.fork_rng(devices=[]):  # reprlab's method for its settings only
        reference = build_method(method_name, create_encoder(args.encoder, **encoder_kwargs(args)), params)
    torch.manual_seed(args.seed)
    spec = peer_parts.TwinSpec(peers.torchvision_resnet18(args.cifar_stem), 512,
                               peer_parts.method_settings(method_name, params), reference, args.image_size,
                               True, HORIZON)
    return peer_methods.build_twin(method_name, spec)


def lightly_model_step(args: argparse.Namespace, method_name: str = "simclr") -> Callable[..., Tensor]:
    """A fresh lightly model of ``method_name`` and its training step ``step(*views)`` (SGD as above)."""
    device = torch.device(args.device)
    if method_name == "simclr":
        model, criterion, optimizer = build_lightly(args)
        model.train()
        return peers.lightly_step(model, criterion, optimizer, device)
    twin = build_lightly_twin(args, method_name).to(device).train()
    optimizer = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], **SGD)
    return peers.twin_step(twin, optimizer, device)


def lightly_dataset(data: ImageSet, augment: ViewAugment, size: int,
                    transform: Callable | None = None) -> torch.utils.data.Dataset:
    """Per-sample SimCLRTransform with ``augment``'s strengths (ImageNet-normalized: torchvision's resnet), or
    ``transform`` (a lightly twin's) when given."""
    transform = transform or peers.lightly_transform(augment, size, normalize=True)
    return peers.PerSampleViews(data.images, data.labels, transform)


def lightly_e2e(args: argparse.Namespace, dataset: torch.utils.data.Dataset, batch_size: int, workers: int,
                steps: int, warmup: int, repeats: int, method_name: str = "simclr") -> tuple[dict, dict]:
    """Pairs/s of lightly's loop: a fresh DataLoader per timed block feeding its training step."""
    device = torch.device(args.device)
    with PeakMemory(device) as memory:
        step = lightly_model_step(args, method_name)

        def consume(batch: Any) -> None:
            views, _ = batch
            step(*views)

        rates = [peers.loader_rate(dataset, batch_size, workers, warmup, steps, consume) for _ in range(repeats)]
    return summarize(rates), memory.as_dict()
