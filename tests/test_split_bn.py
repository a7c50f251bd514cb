"""MoCo's shuffling BatchNorm on one process: SplitBatchNorm2d equals one BatchNorm2d per group (outputs, gradients,
running statistics), is a plain BatchNorm2d in eval mode and in its state dict, refuses a batch that does not
split, and MoCo v2's ``split_bn`` splits query and key encoders alike and shuffles the keys' groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reprlab import distributed
from reprlab.models.encoders import Encoder
from reprlab.ssl import build_method
from reprlab.ssl.split_bn import SplitBatchNorm2d, convert_split_batchnorm, shuffled_forward


def _inputs(n: int = 12, c: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, 5, 4, generator=generator) * 3 + 1).requires_grad_()


def _split_bn(c: int = 3, s: int = 4, momentum: float | None = 0.1) -> SplitBatchNorm2d:
    bn = SplitBatchNorm2d(c, s, momentum=momentum)
    with torch.no_grad():  # not the initial values, so weight, bias and both buffers are exercised
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0][:c]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.7][:c]))
        bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.4][:c]))
        bn.running_var.copy_(torch.tensor([1.5, 0.8, 2.0][:c]))
    return bn


@pytest.mark.parametrize("momentum", [0.1, None])
def test_split_batchnorm_is_one_batchnorm_per_group_of_every_sth_image(momentum):
    s, x = 4, _inputs()
    split = _split_bn(s=s, momentum=momentum).train()
    refs = [nn.BatchNorm2d(3, momentum=momentum).train() for _ in range(s)]
    for ref in refs:
        ref.load_state_dict(_split_bn(s=s, momentum=momentum).state_dict())
    x_ref = x.detach().clone().requires_grad_()

    out = split(x)
    expected = torch.empty_like(out)
    for r, ref in enumerate(refs):
        expected[r::s] = ref(x_ref[r::s])  # group r: images r, r + s, ...
    torch.testing.assert_close(out, expected)

    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(split.weight.grad, sum(ref.weight.grad for ref in refs))
    torch.testing.assert_close(split.bias.grad, sum(ref.bias.grad for ref in refs))
    # running statistics: the mean of the groups' own (lightly keeps one per group and averages them at eval)
    torch.testing.assert_close(split.running_mean, torch.stack([ref.running_mean for ref in refs]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([ref.running_var for ref in refs]).mean(0))
    assert int(split.num_batches_tracked) == 1


def test_split_batchnorm_is_a_plain_batchnorm_in_eval_mode_and_in_its_state_dict():
    split, plain = _split_bn().eval(), nn.BatchNorm2d(3).eval()
    plain.load_state_dict(split.state_dict())  # same keys and shapes both ways
    split.load_state_dict(plain.state_dict())
    x = _inputs().detach()
    torch.testing.assert_close(split(x), plain(x))
    one = SplitBatchNorm2d(3, 1).train()
    one.load_state_dict(plain.state_dict())
    plain.train()
    torch.testing.assert_close(one(x), plain(x))  # one group: plain BatchNorm in training too
    torch.testing.assert_close(one.running_var, plain.running_var)


def test_split_batchnorm_refuses_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match=r"batch of 10 does not split into 4 .*divisible by 4 \(split_bn\)"):
        _split_bn(s=4).train()(torch.randn(10, 3, 2, 2))
    with pytest.raises(ValueError, match="split_bn must be >= 1"):
        convert_split_batchnorm(nn.BatchNorm2d(3), 0)


def test_split_batchnorm_keeps_channels_last():
    x = _inputs().detach()
    out = _split_bn().train()(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _split_bn().train()(x))


def test_conversion_shares_tensors_and_leaves_other_norms():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)), nn.Flatten(),
                        nn.BatchNorm1d(4 * 9))
    weight, mean = net[1].weight, net[1].running_mean
    convert_split_batchnorm(net, 3)
    assert [type(m) for m in (net[1], net[2][0], net[4])] == [SplitBatchNorm2d, SplitBatchNorm2d, nn.BatchNorm1d]
    assert net[1].weight is weight and net[1].running_mean is mean and net[1].num_splits == 3
    # under DDP the loop's SyncBatchNorm conversion takes split layers too (global statistics replace the split)
    distributed.replace_batchnorm(net, distributed.CPUSyncBatchNorm)
    assert isinstance(net[1], distributed.CPUSyncBatchNorm) and net[1].weight is weight


def test_shuffled_forward_restores_the_order_and_changes_the_groups():
    torch.manual_seed(0)
    x = _inputs(n=16).detach()
    torch.testing.assert_close(shuffled_forward(lambda t: t * 2, x), x * 2)  # a per-image network: same result
    bn = _split_bn(s=4).train()
    plain, shuffled = bn(x), shuffled_forward(bn, x)
    assert not torch.allclose(plain, shuffled)  # each image normalized among other images
    torch.manual_seed(1)
    first = shuffled_forward(bn, x)
    torch.manual_seed(1)
    torch.testing.assert_close(shuffled_forward(bn, x), first)  # from torch's generator, which resumes restore


def _tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    return Encoder(backbone, 8, {"name": "tiny", "kwargs": {}})


def test_moco_v2_split_bn_splits_both_encoders_and_shuffles_only_the_keys(monkeypatch):
    params = {"projection_dim": 8, "hidden_dim": 16, "queue_size": 32, "split_bn": 4}
    method = build_method("moco_v2", _tiny_encoder(), params).train()
    assert isinstance(method.encoder.backbone[1], SplitBatchNorm2d)
    assert isinstance(method.key_encoder.backbone[1], SplitBatchNorm2d)
    calls = []
    monkeypatch.setattr("reprlab.ssl.moco.shuffled_forward",
                        lambda network, batch: calls.append(batch) or shuffled_forward(network, batch))
    views = [torch.randn(8, 3, 6, 6), torch.randn(8, 3, 6, 6)]
    out = method.forward_views(views)
    out["loss"].backward()
    assert len(calls) == 1 and calls[0] is views[1]  # the key view only (not symmetric)
    assert method.encoder.backbone[1].weight.grad is not None
    plain = build_method("moco_v2", _tiny_encoder(), {**params, "split_bn": 1})
    assert type(plain.encoder.backbone[1]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="does not split into 4"):
        method.forward_views([torch.randn(6, 3, 6, 6), torch.randn(6, 3, 6, 6)])
