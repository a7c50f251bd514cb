"""Pretraining stage: config -> data, encoder, method -> the training loop -> a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reprlab import distributed, rundir
from reprlab.checkpoint import save_encoder
from reprlab.checks import check_pretrain
from reprlab.config import PretrainConfig, to_dict
from reprlab.contracts import Callback
from reprlab.data.datasets import ImageSet, Split
from reprlab.engine import fit
from reprlab.evaluate.features import extract_features
from reprlab.hardware import processor
from reprlab.optim import build_optimization
from reprlab.ssl import build_method
from reprlab.stages.common import (
    build_batches,
    build_dataset,
    build_encoder,
    check_batch_fits,
    fit_options,
    in_memory,
    seed_everything,
)


class Monitor(Callback):
    """Every ``every`` epochs: online kNN top-1 on the validation split (when labeled) and label-free collapse
    signals (std of L2-normalized embeddings, effective rank) of the encoder output."""

    def __init__(self, encoder: torch.nn.Module, bank: ImageSet, val: ImageSet | None, every: int, k: int,
                 temperature: float, device: torch.device, batch_size: int) -> None:
        self.encoder, self.bank, self.val, self.every = encoder, bank, val, every
        self.k, self.temperature, self.device, self.batch_size = k, temperature, device, batch_size

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        if not self.every or (epoch + 1) % self.every or not distributed.is_main():
            return {}
        from reprlab.evaluate.knn import knn_classify
        from reprlab.evaluate.quality import effective_rank, embedding_std

        bank = extract_features(self.encoder, self.bank.images, self.batch_size, self.device)
        metrics = {"embedding_std": float(embedding_std(bank)), "effective_rank": float(effective_rank(bank))}
        if self.val is not None and self.val.labels is not None and self.bank.labels is not None:
            queries = extract_features(self.encoder, self.val.images, self.batch_size, self.device)
            result = knn_classify(bank, self.bank.labels, queries, k=self.k, temperature=self.temperature)
            metrics["knn_top1"] = result.topk(self.val.labels, 1)
        return metrics


def _monitor_bank(train: Split, max_images: int) -> Split:
    """The monitor's kNN bank: a fixed random subset of at most ``max_images`` training images."""
    if len(train) <= max_images:
        return train
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:max_images]
    return train.subset(keep.sort().values)


def pretrain(cfg: PretrainConfig) -> Path:
    """Run self-supervised pretraining; returns the run directory (``cfg.out_dir/cfg.name``)."""
    check_pretrain(cfg)  # before any process group, data or model: a bad setting fails in one line
    device = distributed.setup(cfg.train.device)
    rank, world = distributed.rank(), distributed.world_size()
    seed_everything(cfg.train.seed + rank)  # each rank draws its own augmentations
    with rundir.claim(Path(cfg.out_dir) / cfg.name) as run:
        if cfg.train.resume:
            run.check_resume(cfg)
        data = build_dataset(cfg.data, cfg.train.seed, progress=cfg.train.progress)
        check_batch_fits(cfg.train.batch_size, len(data.train), world, cfg.data.name)
        encoder = build_encoder(cfg.encoder)
        method = build_method(cfg.method.name, encoder, cfg.method.params)
        if cfg.train.compile:
            encoder.backbone.compile()
        batches = build_batches(data.train, cfg.train.batch_size // world, shuffle=True, drop_last=True,
                                seed=cfg.train.seed, rank=rank, world_size=world)  # streamed or in memory
        optimizer, scheduler = build_optimization(cfg.optim, method, cfg.train.batch_size, len(batches),
                                                  cfg.train.epochs)
        bank = in_memory(_monitor_bank(data.train, cfg.monitor.max_images))  # streamed: decoded once
        monitor = Monitor(encoder, bank, in_memory(data.val, cfg.monitor.max_images),
                          cfg.monitor.every_epochs, cfg.monitor.knn_k, cfg.monitor.knn_temperature, device,
                          batch_size=512)
        run.write_config(cfg)  # everything was built from it: it describes this run's weights
        identity = {"encoder": cfg.encoder.name, "encoder_kwargs": dict(cfg.encoder.kwargs),
                    "method": cfg.method.name}
        result = fit(method, batches, optimizer, scheduler,
                     fit_options(cfg.train, device, run.path, identity, "pretrain", to_dict(cfg)), callbacks=[monitor])
        if distributed.is_main():
            final: dict[str, Any] = result.history[-1] if result.history else {}
            save_encoder(run.path, method.saved_encoder() or encoder, {
                "method": cfg.method.name, "dataset": cfg.data.name, "config": to_dict(cfg), "metrics": final,
                "saved_network": method.saved_network, "numerics": result.numerics, "processor": processor()})
            method.save_artifacts(run.path, next(iter(batches.epoch(0)))["images"][:32].to(device))
        distributed.barrier()
    return run.path
