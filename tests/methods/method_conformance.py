"""Shared conformance checks every distillation method passes; a method subclasses in a few lines.

A subclass sets ``method`` (and optionally ``taps``, ``hparams``, shapes) and implements
``reference`` (an independent, straightforward computation of the terms from the spec formulas,
using the method's own weights) and ``zero_case`` (inputs for which the formula gives 0).
"""

from __future__ import annotations

import copy
from typing import ClassVar, Mapping

import pytest
import torch
from torch import Tensor

from kdcompress.errors import ConfigError
from kdcompress.methods import DistillMethod, build_method

NUM_CLASSES = 5
# Student: fewer channels and, for the deep taps, half the teacher's resolution (OS16 vs OS8).
STUDENT: dict[str, torch.Size] = {
    "backbone": torch.Size((2, 32, 8, 8)),
    "stage4": torch.Size((2, 32, 8, 8)),
    "encoder": torch.Size((2, 16, 8, 8)),
    "decoder": torch.Size((2, 32, 16, 16)),
    "logits": torch.Size((2, NUM_CLASSES, 8, 8)),
}
TEACHER: dict[str, torch.Size] = {
    "backbone": torch.Size((2, 64, 16, 16)),
    "stage4": torch.Size((2, 64, 16, 16)),
    "encoder": torch.Size((2, 24, 16, 16)),
    "decoder": torch.Size((2, 48, 16, 16)),
    "logits": torch.Size((2, NUM_CLASSES, 16, 16)),
}
TOL = {"atol": 1e-5, "rtol": 1e-5}
Feats = dict[str, Tensor]


def make_feats(shapes: Mapping[str, torch.Size], seed: int, requires_grad: bool = False) -> Feats:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen).requires_grad_(requires_grad)
        for name, shape in shapes.items()
    }


def randomize(method: DistillMethod, seed: int = 123) -> DistillMethod:
    """Perturb every trainable parameter and BN running stat so no zero-init hides a path.

    (CanKD's BN starts at γ = β = 0, which would block gradients to θ, φ, g and W.)
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for name, buf in method.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
    return method


def frozen_names(method: DistillMethod) -> set[str]:
    """State-dict names that belong to the teacher-side modules."""
    ids = {
        id(t) for m in method.teacher_side_modules() for t in m.state_dict(keep_vars=True).values()
    }
    return {n for n, t in method.state_dict(keep_vars=True).items() if id(t) in ids}


class MethodConformance:
    """Base test class (not collected: no ``Test`` prefix)."""

    method: ClassVar[str]
    taps: ClassVar[tuple[str, ...] | None] = None
    hparams: ClassVar[dict[str, float]] = {}
    student_shapes: ClassVar[dict[str, torch.Size]] = STUDENT
    teacher_shapes: ClassVar[dict[str, torch.Size]] = TEACHER
    expected_terms: ClassVar[tuple[str, ...]]
    expected_weights: ClassVar[dict[str, float]]

    # --- hooks for subclasses -------------------------------------------------------------
    def reference(self, method: DistillMethod, s: Feats, t: Feats) -> dict[str, Tensor]:
        raise NotImplementedError

    def zero_case(self) -> tuple[DistillMethod, Feats, Feats, tuple[str, ...]]:
        """A method and inputs for which the listed terms must be 0."""
        raise NotImplementedError

    # --- helpers --------------------------------------------------------------------------
    def build(self, seed: int = 0, **hparams: float) -> DistillMethod:
        torch.manual_seed(seed)
        return build_method(
            self.method,
            self.student_shapes,
            self.teacher_shapes,
            NUM_CLASSES,
            taps=self.taps,
            **{**self.hparams, **hparams},
        )

    def inputs(
        self, seed: int = 0, batch: int | None = None, grad: bool = False
    ) -> tuple[Feats, Feats]:
        s = make_feats(self.student_shapes, seed, grad)
        t = make_feats(self.teacher_shapes, seed + 1000, grad)
        if batch is not None:
            s = {k: v[:batch].detach().requires_grad_(grad) for k, v in s.items()}
            t = {k: v[:batch].detach().requires_grad_(grad) for k, v in t.items()}
        return s, t

    # --- the checks -----------------------------------------------------------------------
    def test_terms_are_finite_scalars(self) -> None:
        method = self.build()
        s, t = self.inputs()
        terms = method(s, t)
        assert tuple(sorted(terms)) == tuple(sorted(self.expected_terms))
        for name, value in terms.items():
            assert value.shape == (), name
            assert torch.isfinite(value), name

    def test_loss_weights_name_every_term(self) -> None:
        method = self.build()
        assert method.loss_weights() == self.expected_weights
        s, t = self.inputs()
        assert set(method(s, t)) == set(method.loss_weights())

    def test_gradients_reach_student_and_own_parameters_never_teacher(self) -> None:
        method = randomize(self.build()).train()
        s, t = self.inputs(grad=True)
        weights = method.loss_weights()
        terms = method(s, t)
        sum(weights[k] * v for k, v in terms.items()).backward()
        for tap in method.taps:
            g = s[tap].grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, tap
        for name, x in t.items():
            assert x.grad is None, f"teacher tap {name} received a gradient"
        frozen = frozen_names(method)
        for name, p in method.named_parameters():
            if name in frozen:
                assert not p.requires_grad and p.grad is None, name
            else:
                assert p.requires_grad, name
                assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"

    def test_optimizer_step_leaves_teacher_side_unchanged(self) -> None:
        method = randomize(self.build()).train()
        if not any(p.requires_grad for p in method.parameters()):
            assert not method.teacher_side_modules()  # nothing to train and nothing to freeze
            return
        frozen = frozen_names(method)
        before = copy.deepcopy(method.state_dict())
        opt = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
        for step in range(2):
            s, t = self.inputs(seed=step)
            opt.zero_grad()
            sum(method(s, t).values()).backward()
            opt.step()
        after = method.state_dict()
        for name in frozen:
            assert torch.equal(before[name], after[name]), f"teacher-side {name} changed"
        trainable = [n for n, p in method.named_parameters() if p.requires_grad]
        for name in trainable:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"

    def test_batch_of_copies_equals_single_sample_in_train_mode(self) -> None:
        # Train mode on purpose: BatchNorm uses batch statistics, and a batch of identical
        # copies has exactly the statistics of the single sample, so the terms must not move.
        method = randomize(self.build()).train()
        s1, t1 = self.inputs(batch=1)
        s2 = {k: torch.cat([v, v]) for k, v in s1.items()}
        t2 = {k: torch.cat([v, v]) for k, v in t1.items()}
        one, two = method(s1, t1), method(s2, t2)
        for name in one:
            torch.testing.assert_close(two[name], one[name], **TOL)

    def test_batch_terms_are_mean_of_sample_terms_in_eval_mode(self) -> None:
        # Different samples in one batch: only eval mode makes BN per-sample, and then every
        # term must be the mean of the per-sample terms (scale independent of batch size).
        method = randomize(self.build()).eval()
        s, t = self.inputs()
        both = method(s, t)
        parts = [
            method({k: v[i : i + 1] for k, v in s.items()}, {k: v[i : i + 1] for k, v in t.items()})
            for i in range(2)
        ]
        for name in both:
            torch.testing.assert_close(both[name], (parts[0][name] + parts[1][name]) / 2, **TOL)

    def test_state_dict_round_trip(self) -> None:
        a = randomize(self.build(seed=0), seed=1).eval()
        b = self.build(seed=7).eval()
        b.load_state_dict(a.state_dict())
        s, t = self.inputs()
        ta, tb = a(s, t), b(s, t)
        for name in ta:
            torch.testing.assert_close(tb[name], ta[name], atol=0, rtol=0)

    def test_reference_value(self) -> None:
        method = randomize(self.build()).train()
        s, t = self.inputs(seed=3)
        with torch.no_grad():
            got = method(s, t)
            want = self.reference(method, s, t)
        assert set(got) == set(want)
        for name in got:
            torch.testing.assert_close(got[name], want[name], **TOL)
            assert want[name].abs() > 1e-4, f"reference {name} is trivially zero"

    def test_zero_loss_where_formula_implies_it(self) -> None:
        method, s, t, names = self.zero_case()
        terms = method(s, t)
        assert names, "zero_case must name at least one term"
        for name in names:
            value = float(terms[name].detach())
            assert abs(value) < 1e-6, (name, value)

    def test_unknown_hparam_lists_valid_names(self) -> None:
        with pytest.raises(ConfigError) as err:
            self.build(not_a_knob=1.0)
        message = str(err.value)
        assert "not_a_knob" in message
        for valid in self.expected_hparam_names():
            assert valid in message

    def expected_hparam_names(self) -> list[str]:
        from kdcompress.methods import METHODS

        return list(METHODS.get(self.method).default_hparams)
