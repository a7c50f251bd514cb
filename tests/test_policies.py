"""Freezing policies: each does what it says, read off the weights, BatchNorm buffers and optimizer state."""

from __future__ import annotations

import pytest
import torch

from reprlab import distributed
from reprlab.contracts import Callback
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.engine import FitOptions, fit
from reprlab.finetune.classifier import Classifier
from reprlab.finetune.policies import POLICIES, build_policy
from reprlab.finetune.task import ClassificationTask
from reprlab.models.encoders import create_encoder
from reprlab.optim import build_optimizer, build_scheduler, schedule_factor

NUM_CLASSES = 3
STEPS_PER_EPOCH = 3
GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4"]


def _classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    encoder = create_encoder("timm:resnet18", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
    return Classifier(encoder, NUM_CLASSES, init="xavier")


def _data() -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8 * STEPS_PER_EPOCH, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(8 * STEPS_PER_EPOCH) % NUM_CLASSES
    return ImageSet(images, labels, [f"c{i}" for i in range(NUM_CLASSES)])


class Recorder(Callback):
    """Callback + forward hook: what trains, in which mode, at which lr, at every optimizer step."""

    def __init__(self, task: ClassificationTask, optimizer: torch.optim.Optimizer) -> None:
        self.task, self.optimizer = task, optimizer
        self.epoch, self.steps, self.starts, self.ends = 0, [], [], []
        task.register_forward_pre_hook(self.on_step)

    def on_step(self, module: torch.nn.Module, args: tuple) -> None:
        policy = self.task.policy
        self.steps.append(
            {
                "epoch": self.epoch,
                "trainable": policy.trainable_group_names(),
                "training": {
                    name: all(m.training for m in _modules_of(self.task.classifier, params))
                    for name, params in policy.groups
                },
                "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
            }
        )

    def on_epoch_start(self, epoch: int) -> None:  # runs after the policy's (callback order)
        self.epoch = epoch
        self.starts.append(
            {
                "state": _snapshot(self.task.classifier),
                "optimizer_state": {
                    name: [bool(self.optimizer.state.get(p)) for p in params]
                    for name, params in self.task.policy.groups
                },
            }
        )

    def on_epoch_end(self, epoch: int) -> dict:
        self.ends.append(_snapshot(self.task.classifier))
        return {}


def _modules_of(classifier: Classifier, params: list) -> list[torch.nn.Module]:
    ids = {id(p) for p in params}
    return [m for m in classifier.encoder.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]


def _snapshot(classifier: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in classifier.state_dict().items()}


def _train(
    policy_name: str,
    params: dict | None = None,
    epochs: int = 1,
    optimizer: str = "adamw",
    lr: float = 1e-2,
    weight_decay: float = 0.1,
    schedule: str = "constant",
    warmup_steps: int = 0,
):
    classifier = _classifier()
    policy = build_policy(policy_name, params)
    groups = policy.attach(classifier, weight_decay=weight_decay)
    task = ClassificationTask(classifier, policy, NUM_CLASSES, augment=None)
    opt = build_optimizer(optimizer, groups, lr=lr, weight_decay=weight_decay)
    scheduler = build_scheduler(
        opt, schedule, total_steps=epochs * STEPS_PER_EPOCH, warmup_steps=warmup_steps
    )
    policy.bind(opt, scheduler)
    recorder = Recorder(task, opt)
    before = _snapshot(classifier)
    batches = Batches(_data(), 8, seed=0)
    fit(task, batches, opt, scheduler,
        FitOptions(epochs=epochs, device=torch.device("cpu"), progress=False, log_every=100),
        callbacks=[policy, recorder])
    return classifier, policy, opt, recorder, before


def _keys_of_groups(classifier: Classifier, names: list[str]) -> set[str]:
    """state_dict keys (weights and buffers) of the encoder modules owning the named groups' parameters."""
    groups = dict(classifier.encoder.layer_groups())
    owned = {id(m) for name in names for m in _modules_of(classifier, groups[name])}
    return {
        f"encoder.{prefix}.{key}" if prefix else f"encoder.{key}"
        for prefix, module in classifier.encoder.named_modules()
        if id(module) in owned
        for key in module.state_dict(keep_vars=True)
        if "." not in key
    }


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# ------------------------------------------------------------------------------------------------------------


def test_registry_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; choose from \['full', 'gradual'"):
        build_policy("nope")
    with pytest.raises(ValueError, match="has no parameter 'k'"):
        build_policy("partial", {"k": 2})
    with pytest.raises(ValueError, match="one of freeze_first and train_last"):
        build_policy("partial", {"freeze_first": 1, "train_last": 1})
    with pytest.raises(ValueError, match="decay must be in"):
        build_policy("llrd", {"decay": 1.5})
    with pytest.raises(ValueError, match="only 5 layer groups"):
        build_policy("partial", {"freeze_first": 6}).attach(_classifier(), weight_decay=0.0)


def test_linear_probe_frozen_means_frozen():
    # momentum and weight decay would move any encoder parameter that reached the optimizer
    classifier, _, _, recorder, before = _train("linear_probe", optimizer="sgd", weight_decay=0.1)
    after = _snapshot(classifier)
    encoder_keys = {k for k in before if k.startswith("encoder.")}
    assert any("running_mean" in k for k in encoder_keys) and any(
        "num_batches_tracked" in k for k in encoder_keys
    )
    assert _changed(before, after) == {
        "head.0.weight",
        "head.0.bias",
    }  # every encoder weight and buffer equal
    assert all(not any(step["training"].values()) for step in recorder.steps)  # whole encoder in eval mode


@pytest.mark.parametrize("params", [{"freeze_first": 2}, {"train_last": 3}])
def test_partial_touches_exactly_its_groups(params):
    classifier, policy, opt, recorder, before = _train("partial", params)
    frozen, trained = GROUPS[:2], GROUPS[2:]
    changed = _changed(before, _snapshot(classifier))
    assert not changed & _keys_of_groups(classifier, frozen)  # weights and BatchNorm statistics
    trained_keys = _keys_of_groups(classifier, trained)
    weights = {k for k in trained_keys if k.endswith("weight") and before[k].ndim > 1}
    assert weights <= changed and any("running_var" in k for k in changed & trained_keys)
    assert {"head.0.weight", "head.0.bias"} <= changed
    for step in recorder.steps:
        assert step["trainable"] == trained
        assert step["training"] == {name: name in trained for name in GROUPS}
    assert sorted(g["name"] for g in opt.param_groups) == sorted(  # frozen groups stay out of the optimizer
        ["head", "head", *[f"encoder.{n}" for n in trained for _ in range(2)]]
    )


def test_gradual_unfreezes_on_schedule_with_fresh_optimizer_state():
    epochs = 4
    _, _, opt, recorder, _ = _train("gradual", {"epochs_per_group": 1}, epochs=epochs)
    for step in recorder.steps:  # epoch e: the top e groups train, the others are frozen and in eval mode
        expected = GROUPS[len(GROUPS) - step["epoch"] :] if step["epoch"] else []
        assert step["trainable"] == expected
        assert step["training"] == {name: name in expected for name in GROUPS}
    for epoch, start in enumerate(recorder.starts):  # a group has no optimizer state before it joins
        for index, name in enumerate(GROUPS):
            joined_before = index >= len(GROUPS) - epoch + 1 and epoch > 0
            assert all(start["optimizer_state"][name]) == joined_before, (epoch, name)
    groups = dict(recorder.task.policy.groups)
    for index, name in enumerate(GROUPS):  # Adam's step count restarts at zero when the group joins
        join = len(GROUPS) - index
        steps = [int(opt.state[p]["step"]) for p in groups[name] if p in opt.state]
        expected = max(0, epochs - join) * STEPS_PER_EPOCH
        assert steps == ([expected] * len(groups[name]) if expected else []), name


def test_llrd_lrs_match_the_formula_during_training():
    base_lr, decay, epochs, warmup = 0.02, 0.5, 2, 2
    _, _, _, recorder, _ = _train(
        "llrd", {"decay": decay}, epochs=epochs, lr=base_lr, schedule="cosine", warmup_steps=warmup
    )
    assert len(recorder.steps) == epochs * STEPS_PER_EPOCH
    for step, record in enumerate(recorder.steps):
        factor = schedule_factor("cosine", step, total_steps=epochs * STEPS_PER_EPOCH, warmup_steps=warmup)
        assert record["lr"]["head"] == pytest.approx(base_lr * factor, rel=1e-12)
        for index, name in enumerate(GROUPS):
            expected = base_lr * decay ** (len(GROUPS) - index) * factor
            assert record["lr"][f"encoder.{name}"] == pytest.approx(expected, rel=1e-12), (step, name)


def test_full_with_lower_encoder_lr():
    _, _, _, recorder, _ = _train("full", {"encoder_lr_scale": 0.1}, lr=0.01)
    record = recorder.steps[0]
    assert record["lr"]["head"] == pytest.approx(0.01)
    assert all(record["lr"][f"encoder.{n}"] == pytest.approx(0.001) for n in GROUPS)
    assert record["trainable"] == GROUPS and all(record["training"].values())


def test_lp_ft_switches_phase_and_keeps_the_probed_head():
    lr, scale, probe = 0.01, 0.1, 2
    classifier, _, _, recorder, before = _train(
        "lp_ft", {"probe_epochs": probe, "ft_lr_scale": scale}, epochs=3, lr=lr
    )
    for record in recorder.steps:
        probing = record["epoch"] < probe
        assert record["trainable"] == ([] if probing else GROUPS)
        assert all(v is not probing for v in record["training"].values())
        expected = lr * (1.0 if probing else scale)
        assert all(v == pytest.approx(expected, rel=1e-12) for v in record["lr"].values())
    end_of_probe, start_of_ft = recorder.ends[probe - 1], recorder.starts[probe]["state"]
    encoder_keys = [k for k in before if k.startswith("encoder.")]
    assert all(
        torch.equal(end_of_probe[k], before[k]) for k in encoder_keys
    )  # the probe left the encoder alone
    assert all(
        torch.equal(start_of_ft[k], end_of_probe[k]) for k in before
    )  # FT starts from the probed model
    assert not torch.equal(end_of_probe["head.0.weight"], before["head.0.weight"])
    changed = _changed(end_of_probe, _snapshot(classifier))
    assert any(k.startswith("encoder.") for k in changed)


def test_phase_lr_is_idempotent_for_resume():
    classifier = _classifier()
    policy = build_policy("lp_ft", {"probe_epochs": 1, "ft_lr_scale": 0.1})
    opt = build_optimizer("sgd", policy.attach(classifier, weight_decay=0.0), lr=1.0)
    scheduler = build_scheduler(opt, "cosine", total_steps=10)
    policy.bind(opt, scheduler)
    for _ in range(4):
        opt.step()
        scheduler.step()
    policy.on_epoch_start(1)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(0.1 * schedule_factor("cosine", 4, total_steps=10))
    state = (
        scheduler.state_dict()
    )  # a resumed run loads the already-scaled state, then starts the epoch again
    scheduler.load_state_dict(state)
    policy.on_epoch_start(1)
    assert [g["lr"] for g in opt.param_groups] == lrs


def test_frozen_modules_are_the_frozen_groups():
    classifier = _classifier()
    policy = build_policy("partial", {"freeze_first": 1})
    policy.attach(classifier, weight_decay=0.0)
    backbone = classifier.encoder.backbone
    assert {id(m) for m in policy.frozen_modules()} == {id(backbone.conv1), id(backbone.bn1)}
    policy = build_policy("linear_probe")
    policy.attach(classifier, weight_decay=0.0)
    assert policy.frozen_modules() == [classifier.encoder]


def test_phased_policies_refuse_ddp(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for name in POLICIES:
        policy = build_policy(name)
        if policy.static:
            policy.attach(_classifier(), weight_decay=0.0)
        else:
            with pytest.raises(ValueError, match="DistributedDataParallel"):
                policy.attach(_classifier(), weight_decay=0.0)
