"""The banded CanKD / ACAM-KD losses on CUDA: same value and student gradient as one pass (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from kdcompress.methods import build_method


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["cankd", "acam"])
def test_banded_loss_matches_one_pass_on_cuda(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # one pass runs convs; bands in fp32 too
    shape = torch.Size((2, 32, 24, 20))
    taps = {"taps": ["feat"]}
    one = build_method(method, {"feat": shape}, {"feat": shape}, 5, chunk_positions=0, **taps).cuda().train()
    banded = build_method(method, {"feat": shape}, {"feat": shape}, 5, chunk_positions=64, **taps).cuda().train()
    banded.load_state_dict(one.state_dict())
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(shape, generator=gen, device="cuda", requires_grad=True)
    t = torch.randn(shape, generator=gen, device="cuda")
    values, grads = [], []
    for m in (one, banded):
        total = sum(m({"feat": s}, {"feat": t}).values())
        values.append(total.detach())
        grads.append(torch.autograd.grad(total, s)[0])
    torch.testing.assert_close(values[1], values[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
