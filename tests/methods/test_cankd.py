"""CanKD: conformance, associativity of the linear-memory path, identity at step 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.errors import ConfigError
from kdcompress.methods import build_method
from kdcompress.methods import cankd as cankd_module
from kdcompress.methods.cankd import CanBlock, CanKD, linear_affinity, naive_affinity
from tests.methods.method_conformance import (
    NUM_CLASSES,
    TEACHER,
    TOL,
    Feats,
    MethodConformance,
    make_feats,
    randomize,
)


def ref_conv1x1(x: Tensor, conv: nn.Conv2d) -> Tensor:
    out = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
    return out + conv.bias[None, :, None, None]


def ref_pool2x2(x: Tensor) -> Tensor:
    b, c, h, w = x.shape  # even sizes in these tests
    return x.reshape(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))


def ref_bn_train(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[
        None, :, None, None
    ]


def ref_instance_norm(x: Tensor) -> Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def ref_can(block: CanBlock, y_s: Tensor, y_t: Tensor) -> Tensor:
    b, c, h, w = y_s.shape
    q = ref_conv1x1(y_s, block.theta).flatten(2)  # B×C'×HW
    k = ref_pool2x2(ref_conv1x1(y_t, block.phi)).flatten(2)  # B×C'×N
    v = ref_pool2x2(ref_conv1x1(y_t, block.g)).flatten(2)
    n = k.shape[2]
    affinity = torch.einsum("bcp,bcn->bpn", q, k) / n  # the full HW×N matrix, no softmax
    y = torch.einsum("bpn,bcn->bcp", affinity, v).reshape(b, -1, h, w)
    return ref_bn_train(ref_conv1x1(y, block.w), block.bn) + y_s


def ref_cankd(method: CanKD, s: Feats, t: Feats) -> Tensor:
    total = torch.zeros(())
    for tap in method.taps:
        adapter = method.adapter[tap]
        y_s = s[tap] if isinstance(adapter, nn.Identity) else ref_conv1x1(s[tap], adapter)
        y_s = F.interpolate(y_s, size=t[tap].shape[-2:], mode="bilinear", align_corners=False)
        z_s = ref_can(method.can[tap], y_s, t[tap])
        total = total + ((ref_instance_norm(z_s) - ref_instance_norm(t[tap])) ** 2).mean()
    return total


class TestCanKD(MethodConformance):
    method = "cankd"
    expected_terms = ("can",)
    expected_weights = {"can": 5.0}

    def reference(self, method, s, t):  # type: ignore[no-untyped-def]
        assert method.training  # the reference uses batch statistics
        return {"can": ref_cankd(method, s, t)}

    def zero_case(self):  # type: ignore[no-untyped-def]
        # Step 0 (BN γ = β = 0, so z_s = y_s), equal widths, y_s = y_t: IN(z_s) = IN(y_t).
        method = build_method("cankd", TEACHER, TEACHER, NUM_CLASSES).train()
        feats = make_feats(TEACHER, seed=5)
        return method, feats, {k: v.clone() for k, v in feats.items()}, ("can",)


class TestCanKDTwoLevels(TestCanKD):
    """Several levels (FPN style), one Can block each, terms summed; mu overridden."""

    taps = ("encoder", "decoder")
    hparams = {"mu": 10.0}
    expected_weights = {"can": 10.0}


def test_linear_affinity_equals_naive_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 96, 16, generator=gen)
    k = torch.randn(2, 24, 16, generator=gen)
    v = torch.randn(2, 24, 16, generator=gen)
    torch.testing.assert_close(linear_affinity(q, k, v), naive_affinity(q, k, v), **TOL)


def test_method_linear_and_naive_paths_agree_with_gradients() -> None:
    method = randomize(build_method("cankd", TEACHER, TEACHER, NUM_CLASSES)).train()
    s = make_feats(TEACHER, seed=1, requires_grad=True)
    t = make_feats(TEACHER, seed=2)
    fast = method(s, t)["can"]
    (g_fast,) = torch.autograd.grad(fast, s["stage4"])
    method.set_naive(True)
    slow = method(s, t)["can"]
    (g_slow,) = torch.autograd.grad(slow, s["stage4"])
    torch.testing.assert_close(fast, slow, **TOL)
    torch.testing.assert_close(g_fast, g_slow, **TOL)


def test_can_block_is_identity_at_init() -> None:
    block = CanBlock(16).train()
    y_s, y_t = torch.randn(2, 16, 6, 10), torch.randn(2, 16, 6, 10)
    torch.testing.assert_close(block(y_s, y_t), y_s, atol=0, rtol=0)


def test_odd_sizes_keep_border_and_single_pixel_maps_work() -> None:
    block = CanBlock(8).eval()
    out = block(torch.randn(1, 8, 1, 1), torch.randn(1, 8, 1, 1))
    assert out.shape == (1, 8, 1, 1) and torch.isfinite(out).all()
    assert block.pool(torch.zeros(1, 1, 65, 129)).shape[-2:] == (33, 65)


def test_adapter_only_when_widths_differ() -> None:
    shapes_s = {"backbone": torch.Size((2, 32, 8, 8))}
    shapes_t = {"backbone": torch.Size((2, 64, 16, 16))}
    assert isinstance(build_method("cankd", shapes_s, shapes_t, 5, taps=["backbone"]).adapter["backbone"], nn.Conv2d)
    assert isinstance(build_method("cankd", shapes_t, shapes_t, 5, taps=["backbone"]).adapter["backbone"], nn.Identity)


class TestCanKDChunked(TestCanKD):
    """The whole conformance suite through the banded path (tiny bands force it on these small maps)."""

    hparams = {"chunk_positions": 4.0}


def _loss_and_grads(method: CanKD, s: Feats, t: Feats) -> tuple[Tensor, list[Tensor]]:
    loss = method(s, t)["can"]
    params = [p for p in method.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*s.values(), *params])
    return loss, list(grads)


def test_chunked_path_matches_one_pass_in_value_gradients_and_running_stats() -> None:
    # odd height (last band odd, ceil-mode pooling), a width adapter and a resize on the way in
    shapes_s = {"feat": torch.Size((2, 12, 5, 6))}
    shapes_t = {"feat": torch.Size((2, 16, 9, 10))}
    one = randomize(build_method("cankd", shapes_s, shapes_t, 5, taps=["feat"], chunk_positions=0)).train()
    banded = build_method("cankd", shapes_s, shapes_t, 5, taps=["feat"], chunk_positions=20).train()
    banded.load_state_dict(one.state_dict())
    s = make_feats(shapes_s, seed=3, requires_grad=True)
    t = make_feats(shapes_t, seed=4)
    loss_one, grads_one = _loss_and_grads(one, s, t)
    loss_banded, grads_banded = _loss_and_grads(banded, s, t)
    torch.testing.assert_close(loss_banded, loss_one, rtol=1e-5, atol=1e-6)
    for g_banded, g_one in zip(grads_banded, grads_one, strict=True):
        torch.testing.assert_close(g_banded, g_one, rtol=1e-4, atol=1e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(banded.can["feat"].bn, name), getattr(one.can["feat"].bn, name))


def test_chunked_path_only_on_large_maps_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = cankd_module.chunked_can_loss
    monkeypatch.setattr(cankd_module, "chunked_can_loss", lambda *a: calls.append(1) or real(*a))
    method = randomize(build_method("cankd", TEACHER, TEACHER, NUM_CLASSES, chunk_positions=8)).train()
    s, t = make_feats(TEACHER, seed=1, requires_grad=True), make_feats(TEACHER, seed=2)
    method(s, t)
    assert len(calls) == 1
    method.eval()
    method(s, t)
    build_method("cankd", TEACHER, TEACHER, NUM_CLASSES).train()(s, t)  # default 2048 > these maps
    assert len(calls) == 1


def test_chunk_positions_must_be_a_whole_number() -> None:
    with pytest.raises(ConfigError, match="chunk_positions"):
        build_method("cankd", TEACHER, TEACHER, NUM_CLASSES, chunk_positions=2.5)


def test_chunked_path_under_bf16_autocast_matches_fp32() -> None:
    shapes = {"feat": torch.Size((1, 16, 8, 6))}
    method = randomize(build_method("cankd", shapes, shapes, 5, taps=["feat"], chunk_positions=12)).train()
    s = make_feats(shapes, seed=3, requires_grad=True)
    t = make_feats(shapes, seed=4)
    ref = method(s, t)["can"]
    (g_ref,) = torch.autograd.grad(ref, s["feat"])
    s16 = {"feat": s["feat"].detach().bfloat16().requires_grad_()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = method(s16, {"feat": t["feat"].bfloat16()})["can"]
    (g_half,) = torch.autograd.grad(half, s16["feat"])
    assert g_half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(g_half.float(), g_ref, rtol=5e-2, atol=5e-3)


def test_block_ablation_is_in_mse_of_the_adapted_student_map() -> None:
    """block=0 keeps no Can block: the loss is IN-MSE(adapter(F^S), F^T) and differs from the block's once it has learnt."""
    shapes_s = {"backbone": torch.Size((2, 8, 6, 6))}
    shapes_t = {"backbone": torch.Size((2, 16, 6, 6))}
    torch.manual_seed(0)
    s, t = {"backbone": torch.randn(2, 8, 6, 6)}, {"backbone": torch.randn(2, 16, 6, 6)}
    ablation = build_method("cankd", shapes_s, shapes_t, NUM_CLASSES, taps=["backbone"], block=0).train()
    assert len(ablation.can) == 0
    expected = ((ref_instance_norm(ref_conv1x1(s["backbone"], ablation.adapter["backbone"]))
                 - ref_instance_norm(t["backbone"])) ** 2).mean()
    torch.testing.assert_close(ablation(s, t)["can"], expected, **TOL)
    full = build_method("cankd", shapes_s, shapes_t, NUM_CLASSES, taps=["backbone"]).train()
    full.adapter.load_state_dict(ablation.adapter.state_dict())
    randomize(full.can)  # a trained block changes the student's map before the loss
    assert not torch.allclose(full(s, t)["can"], expected)
    with pytest.raises(ConfigError, match="'block'.*0 or 1"):
        build_method("cankd", shapes_s, shapes_t, NUM_CLASSES, taps=["backbone"], block=0.5)


@pytest.mark.parametrize("chunk_positions", [0, 20])
def test_detached_query_sends_the_student_only_the_residual_gradient(chunk_positions: int) -> None:
    """detach_query=1: same loss; the student map's gradient is ∂L/∂z_s (z_s = branch + y_s), none through θ."""
    shapes = {"feat": torch.Size((2, 16, 6, 10))}
    s, t = make_feats(shapes, seed=3, requires_grad=True), make_feats(shapes, seed=4)
    attached = randomize(build_method("cankd", shapes, shapes, 5, taps=["feat"], chunk_positions=chunk_positions))
    detached = build_method("cankd", shapes, shapes, 5, taps=["feat"], chunk_positions=chunk_positions,
                            detach_query=1)
    detached.load_state_dict(attached.state_dict())
    loss_a = attached.train()(s, t)["can"]
    (g_attached,) = torch.autograd.grad(loss_a, s["feat"])
    loss_d = detached.train()(s, t)["can"]
    (g_detached,) = torch.autograd.grad(loss_d, s["feat"])
    torch.testing.assert_close(loss_d, loss_a, rtol=1e-5, atol=1e-6)
    z = detached.can["feat"](s["feat"].detach(), t["feat"]).detach().requires_grad_()
    (g_z,) = torch.autograd.grad(F.mse_loss(F.instance_norm(z), F.instance_norm(t["feat"])), z)
    torch.testing.assert_close(g_detached, g_z, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(g_attached, g_detached, rtol=1e-3, atol=1e-6)  # θ's path carried gradient before
    with pytest.raises(ConfigError, match="block=0 removes"):
        build_method("cankd", shapes, shapes, 5, taps=["feat"], block=0, detach_query=1)
