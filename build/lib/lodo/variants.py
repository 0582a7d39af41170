"""LODO and its ablations (SPEC §1.3) as one table, ``VARIANTS``: a row is all that tells a variant apart.

Both front ends are generated from the table: the Keras optimizers (``lodo.keras_optimizer``:
``LODO``, ``LODODiagonal``, …) and the multi-seed engine's (``lodo.multi_seed``:
``MultiSeedLODO``, …). A row gives the preconditioner (whose dataclass fields become
hyperparameters), the default ``initial_lr``/``meta_lr``/``beta`` and the hyperparameters the
variant pins (not constructor keywords, not in the Keras config). A new variant is a new row.

A variant's hyperparameters, in constructor order: ``initial_lr, meta_lr, beta``, the
preconditioner's fields, ``meta_optimizer``, less the pinned ones. ``configs/optimizer/<name>.yaml``
lists exactly these with the same defaults (checked by test_ablations.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Mapping

from lodo import preconditioners
from lodo.algorithm import LODOHyperparams

DEFAULT_META_OPTIMIZER = "adam"

ARGUMENT_DOCS = {
    "initial_lr": "α0, the scale of G(φ); the variant starts as momentum SGD with this learning rate.",
    "meta_lr": "learning rate of the meta-optimizer that trains φ.",
    "beta": "β, the momentum of the gradient EMA m that G is applied to.",
    "meta_optimizer": '``"adam"`` (the paper) or ``"sgd"`` (the LODO-SGD ablation): trains φ.',
}


@dataclass(frozen=True)
class Variant:
    """One member of the LODO family; see the module docstring."""

    name: str  # config name (configs/optimizer/<name>.yaml), the engine optimizer's and the Keras default name
    class_name: str  # the Keras class; the engine's is "MultiSeed" + class_name
    label: str  # as the paper's tables write it
    summary: str  # what the variant changes, one sentence for docstrings
    preconditioner: type  # a lodo.preconditioners class; its dataclass fields are hyperparameters
    defaults: LODOHyperparams
    pinned: Mapping[str, object] = field(default_factory=dict)  # hyperparameters fixed by the variant
    preconditioner_defaults: Mapping[str, object] = field(default_factory=dict)  # overrides of the fields' defaults

    def __post_init__(self):
        known = {"initial_lr", "meta_lr", "beta", "meta_optimizer", *self._fields()}
        for key in (*self.pinned, *self.preconditioner_defaults):
            if key not in known:
                raise ValueError(f"{self.label}: {key!r} is not one of its hyperparameters {sorted(known)}")

    def _fields(self) -> dict:
        return {f.name: f for f in dataclasses.fields(self.preconditioner)}

    @property
    def preconditioner_fields(self) -> dict:
        """The preconditioner's hyperparameters and their defaults, e.g. ``{"num_layers": 16, "block_size": 4}``."""
        return {name: self.preconditioner_defaults.get(name, f.default) for name, f in self._fields().items()}

    def hyperparameters(self) -> dict:
        """Constructor keywords shared by both front ends and their defaults, in order (pinned ones left out)."""
        everything = {"initial_lr": self.defaults.initial_lr, "meta_lr": self.defaults.meta_lr,
                      "beta": self.defaults.beta, **self.preconditioner_fields,
                      "meta_optimizer": DEFAULT_META_OPTIMIZER}
        return {k: v for k, v in everything.items() if k not in self.pinned}

    def settings(self, given: Mapping) -> dict:
        """Every hyperparameter: the constructor's ``given`` values, then the pinned ones."""
        pinned = set(self.pinned) & set(given)
        if pinned:
            raise ValueError(f"{self.label} pins {', '.join(f'{k}={self.pinned[k]!r}' for k in sorted(pinned))}; "
                             f"it takes no such argument")
        return {**self.hyperparameters(), **given, **self.pinned}

    def make_preconditioner(self, settings: Mapping):
        """The preconditioner with its fields taken from ``settings``; its ``__post_init__`` validates them."""
        return self.preconditioner(**{name: settings[name] for name in self.preconditioner_fields})

    def docstring(self, headline: str, keywords: Mapping, extra_docs: Mapping = {}, footer: str = "") -> str:
        """A front end's class docstring: ``headline``, the pinned hyperparameters, and an ``Args:``
        section for ``keywords`` (name → default), described by ``extra_docs`` where the row cannot."""
        fields = self._fields()
        docs = {**{k: ARGUMENT_DOCS.get(k) or fields[k].metadata.get("doc", "") for k in self.hyperparameters()},
                **extra_docs}
        pinned = "".join(f"\n\nPinned: {k} = {v!r}." for k, v in self.pinned.items())
        args = "".join("\n" + textwrap.fill(f"{k}: {docs[k]} Default: {v!r}.", 100, initial_indent="    ",
                                             subsequent_indent="        ") for k, v in keywords.items())
        return f"{headline}{pinned}\n\nArgs:{args}{footer}\n"


def signature(keywords: Mapping, var_keyword: str | None = None) -> inspect.Signature:
    """``(k1=default1, k2=default2, …[, **var_keyword])``: a generated constructor's signature."""
    parameter = inspect.Parameter
    return inspect.Signature([parameter(k, parameter.POSITIONAL_OR_KEYWORD, default=v) for k, v in keywords.items()]
                             + ([parameter(var_keyword, parameter.VAR_KEYWORD)] if var_keyword else []))


# Defaults: LODO's are the paper's bowl values; the ablations' are the image-generation values of
# the paper's Table 6 (SPEC §4.2, before the halving of §4.1). Global's and Residuals' meta_lr did
# not survive in our copy of the paper; they take LODO's own image-generation meta_lr.
LODO = Variant(
    "lodo", "LODO", "LODO",
    "Learning to Optimize During Optimization (Liao et al., TMLR 2023): G(φ) = α0·G̃ᵀG̃, "
    "G̃ a deep block-permutation network whose blocks φ are trained by Adam on the hypergradient.",
    preconditioners.BlockPermutation, LODOHyperparams(initial_lr=0.270, meta_lr=0.00096, beta=0.195))
DIAGONAL = Variant(
    "lodo_diagonal", "LODODiagonal", "LODO-Diagonal", "G = α0·diag(φ), φ initialized to ones.",
    preconditioners.Diagonal, LODOHyperparams(initial_lr=0.1325, meta_lr=0.0005196, beta=0.9860))
GLOBAL = Variant(
    "lodo_global", "LODOGlobal", "LODO-Global", "G = α0·φ·I, one learned scalar φ initialized to 1.",
    preconditioners.Global, LODOHyperparams(initial_lr=0.05583, meta_lr=7.946e-6, beta=0.9525))
RESIDUALS = Variant(
    "lodo_residuals", "LODOResiduals", "LODO-Residuals",
    "G = α0·RᵀDR, R a product of ``num_layers`` residual permutation layers.",
    preconditioners.Residual, LODOHyperparams(initial_lr=0.02134, meta_lr=7.946e-6, beta=0.9301))
NO_MOMENTUM = Variant(
    "lodo_no_momentum", "LODONoMomentum", "LODO-No-Momentum", "β = 0, so G is applied to the raw gradient.",
    preconditioners.BlockPermutation, LODOHyperparams(initial_lr=0.08459, meta_lr=7.946e-6, beta=0.0),
    pinned={"beta": 0.0})
SGD = Variant(
    "lodo_sgd", "LODOSGD", "LODO-SGD",
    "φ is trained by plain gradient descent (learning rate ``meta_lr``) instead of Adam.",
    preconditioners.BlockPermutation, LODOHyperparams(initial_lr=0.1035, meta_lr=0.0007196, beta=0.9499),
    pinned={"meta_optimizer": "sgd"})

VARIANTS = (LODO, DIAGONAL, GLOBAL, RESIDUALS, NO_MOMENTUM, SGD)
BY_NAME = {v.name: v for v in VARIANTS}
