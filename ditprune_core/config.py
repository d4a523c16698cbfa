"""What to prune and how: :class:`PruneConfig`, its constants and its parsing (one home for each rule).

Every choice a caller can make is validated here, once, when the config is built: the metric
(by :func:`~ditprune_core.score.check_metric`), the comparison group, the N:M pattern (by
:func:`parse_pattern`, which the nodes use too) and the layer selection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .cluster import ClusterParams
from .layers import DEFAULT_FAMILIES, FAMILIES, LayerFilter
from .quantize import DEFAULT_DENSE_SPECS, DEFAULT_VALUE_SPECS, VALUE_BITS, QuantSpec
from .refine import REFINE_STEPS
from .score import MetricParams, check_metric, needs_calibration

__all__ = [
    "ALLOCATIONS",
    "DENSE_VALUE_BITS",
    "GRANULARITIES",
    "PATTERNS",
    "REFITS",
    "REMAINDER_CODE_BITS",
    "UPDATES",
    "UPGRADE_ATTENTION",
    "UPGRADE_CHOICES",
    "ProgressFn",
    "PruneConfig",
    "ReconstructParams",
    "chosen_families",
    "parse_pattern",
    "pattern_sparsity",
]

GRANULARITIES = ("layer", "row", "column", "cluster")
PATTERNS = ("unstructured", "2:4", "4:8")
#: ``none``: mask only (the kept weights stay as they are); ``obs``: reconstruction (OBS update + refit)
UPDATES = ("none", "obs")
#: how the kept weights are refit for the fixed mask after the OBS update
REFITS = ("none", "auto", "exact", "pcg")
#: where the mask of update="obs" comes from
OBS_MASKS = ("metric", "in-update")
#: how update="obs" shares a transformer block's prune count among its layers
ALLOCATIONS = ("uniform", "block")
#: value bits of a quantise-only config (sparsity 0): those of kept values, and 2
DENSE_VALUE_BITS = tuple(sorted(DEFAULT_DENSE_SPECS))
#: the bits ``PruneConfig.remainder_bits`` may take: those of Save Pruned Model's integer remainders
REMAINDER_CODE_BITS = (3, 4, 8)
#: ``PruneConfig.upgrade_layers`` for FLUX-style blocks: both streams' attention qkv and the image
#: stream's attention output (docs/bench/frontier.md measures it)
UPGRADE_ATTENTION = r"(img|txt)_attn\.qkv|img_attn\.proj"
#: the mixed-precision choices a size target names (the table's ``upgrade_layers``) and their regexes
UPGRADE_CHOICES: dict[str, str | None] = {"none": None, "attention int4": UPGRADE_ATTENTION}


@dataclass(frozen=True)
class ReconstructParams:
    """How ``update="obs"`` reconstructs a layer; the defaults are what the reconstruction
    benchmark measured best (``python -m bench.reconstruction_lab``).

    Attributes:
        mask: ``"metric"``: the config's own mask (metric, granularity, pattern: DiT-Pruning energy by
            default), chosen on the layer's weights and calibration before the update, then kept
            fixed; ``"in-update"``: chosen inside the OBS update, SparseGPT-style, by
            ``(w²)^(1-β) · (1/[H⁻¹]_jj²)^β`` a block of columns at a time.
        balance: β of the in-update saliency (0.5 is SparseGPT's ``w² / [H⁻¹]²_jj``).
        blocksize: columns per lazy OBS block.
        damp: dampening of the Gram, relative to its mean diagonal (dead input channels are handled
            by it: never a crash on a singular Gram).
        shrink: α of the Gram's shrinkage toward its diagonal, ``(1 - α) H + α · diag(H)``, in the
            OBS update, the refit and the quantising sweep (:func:`~ditprune_core.obs.shrunk`; the
            reported errors stay on the Gram as measured): less of the fit goes into input
            correlations that only the calibration's prompts have, so more of it holds on prompts
            the calibration never saw.
            Default 0: held out, shrinking every layer's Gram helped miniflux-a and -b but raised
            miniflux-c's error at 70% (its image-stream layers lost more than they gained).
        shrink_text: the same for the layers whose inputs are the text tokens only (the template's
            ``text_stream``: FLUX's ``txt_attn``/``txt_mlp``, SD3's ``context_block``...): a few
            prompts give them few distinct inputs, so their Gram is the one that overfits most
            (calibrated on five classes, their error on the other five was 3-13x that on the five
            on miniflux-a, against 1.2-2.6x for the image-stream layers). Default 0.3, chosen on the
            held-out error of miniflux-a and -b, confirmed on miniflux-c (docs/BENCHMARKS.md, the headline).
        refit: ``"none"``, ``"exact"`` (per-row masked least squares), ``"pcg"`` (preconditioned
            conjugate gradient warm-started from the OBS result) or ``"auto"`` (exact up to
            ``exact_max_in`` inputs, PCG above).
        refit_iters: PCG iterations at most. 5 (measured, docs/bench/reconstruction_lab.md and
            obs_speed.md): on MiniFlux 5 iterations recover about 90% of the exact refit's gain over
            the OBS update alone and 20 all of it, while at FLUX.1-dev width each iteration costs
            about as much as the OBS update (5: 6.9 h for the whole model on a 2-core CPU, 20: 21 h).
        refit_tol: PCG stops earlier when every row's relative residual is below this.
        exact_max_in: the largest input size ``"auto"`` solves exactly.
        allocation: ``"uniform"``: every layer is pruned to the config's sparsity; ``"block"``: the
            layers of one transformer block (within one pass) share the block's prune count, which
            stays exact, and each layer's share follows its estimated relative output error
            (:func:`~ditprune_core.reconstruct.allocate_block_counts`). Unstructured only: N:M
            patterns fix every layer's sparsity.
        allocation_spread: how far a layer's sparsity may move from the config's, either way.
        block_refine_steps: Adam steps per transformer block of block refinement, 0 (the default)
            to skip it (:mod:`~ditprune_core.refine`). **Off by default**: held out, on the test-bed
            the defaults were not tuned on (miniflux-c, classes 0-4 calibrated, 5-9 evaluated) every
            block's fit was put back and the held-out error was that of no refinement at 5.4x the
            run time (README, "What does not hold yet"; the held-out benchmark,
            docs/bench/generalisation.md, measures these settings on every test-bed); on
            miniflux-a/b it had cut the error on the
            classes it was calibrated on by 24-31% (docs/bench/reconstruction_lab.md), which does
            not transfer to unseen prompts (the generalisation issue's wider models: put back on
            every block, or held-out error 4% worse). After a block's layers are reconstructed, their kept
            weights are fitted together so that the block's output matches the dense block's on its
            calibration inputs as the model pruned upstream of it sees them, masks fixed (sparsity
            unchanged). Each refined block costs one more calibration run. With ``value_bits`` the
            block is refined first, then each layer's kept values are quantised jointly on its Gram
            (the Grams of a pass live until its blocks are refined: no more than the budget).
        block_refine_lr: Adam's starting learning rate (cosine decay to 0 over the steps): with the
            ``"relative"`` step, a fraction of each layer's RMS of kept weights.
        block_refine_calls: at most this many of a block's calibration forward calls are kept
            (a uniform sample) to refine on; they stay on the model's device.
        block_refine_step: ``"relative"`` (the default: the rate times each layer's RMS of kept
            weights, scale-invariant, so the same rate suits MiniFlux's weights and FLUX.1-dev's,
            about 0.02) or ``"absolute"`` (Adam's rate in weight units, the earlier default, tuned
            on MiniFlux only); :data:`~ditprune_core.refine.REFINE_STEPS`.
        block_refine_holdout: fraction of a block's recorded calls held out of the fit (default a
            quarter); the fit whose held-out error is lowest is kept, and none that is worse on them
            than no fit (early stopping; 0: off, the fit is judged on the calls it was fitted on).
        block_refine_patience: stop refining once this many blocks in a row gained nothing (put
            back, or with held-out calls kept at their starting weights): the blocks after them are
            written as reconstructed, with no sampler run to record their calls (a model on which
            refinement does not pay costs ``passes + patience`` sampler runs, not ``passes +
            blocks``). Default 2; 0: off, every block is refined.
        remainder_damp: dampening of the remainder's Grams when ``PruneConfig.remainder_bits``
            quantises it by GPTQ, relative to their mean diagonal. Much more than ``damp``: a
            modulation layer's input is the conditioning vector (timestep, guidance, pooled
            prompt), and the calibration's few prompts span few of its directions: held out, GPTQ
            with ``damp`` 0.01 fitted the calibrated classes 4-8x better than round to nearest and
            the other classes barely better (0.98x / 0.89x on miniflux-a / -b). Default 1.0,
            chosen on miniflux-a and -b (int3, modulation alone; tried 0.1, 0.3, 1, 3 and Gram
            shrinkage 0.3 / 0.6; held-out
            error 0.00128 / 0.00152 against round to nearest's 0.00207 / 0.00377) and confirmed on
            miniflux-c (0.00016 against 0.00129): docs/BENCHMARKS.md.
        dense_damp: dampening of the quantising sweep when nothing is pruned (quantise only: dense
            GPTQ), relative to the Gram's mean diagonal; ``damp`` dampens the OBS pruning and the
            quantising of a pruned layer's kept values. Default 0.1: held out, dense int3 with the
            attention layers in int4 lost 25% / 16% of its error on miniflux-a / -b against 0.01
            (lower on each of the four calibrated halves; 0.03 and 0.3 were less consistent), and
            on miniflux-c, the confirmation, int4 got better but int3 worse (+28% on int3 + attention
            int4): kept for the lower mean over all three. The same for the kept values of pruned
            layers was mixed (-14% to +5%) and is not taken.
    """

    mask: str = "in-update"
    balance: float = 0.4
    blocksize: int = 128
    damp: float = 0.01
    shrink: float = 0.0
    shrink_text: float = 0.3
    refit: str = "auto"
    refit_iters: int = 5
    refit_tol: float = 1e-4
    exact_max_in: int = 1024
    allocation: str = "block"
    allocation_spread: float = 0.3
    block_refine_steps: int = 0
    block_refine_lr: float = 2e-2
    block_refine_calls: int = 64
    block_refine_step: str = "relative"
    block_refine_holdout: float = 0.25
    block_refine_patience: int = 2
    remainder_damp: float = 1.0
    dense_damp: float = 0.1

    def shrink_of(self, text_stream: bool) -> float:
        """The Gram shrinkage of a layer: ``shrink_text`` for a text-stream layer, else ``shrink``."""
        return self.shrink_text if text_stream else self.shrink

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose from {list(ALLOCATIONS)}")
        if not 0.0 <= self.allocation_spread < 1.0:
            raise ValueError(f"allocation_spread must be in [0, 1), got {self.allocation_spread}")
        if self.mask not in OBS_MASKS:
            raise ValueError(f"unknown OBS mask source {self.mask!r}; choose from {list(OBS_MASKS)}")
        if self.refit not in REFITS:
            raise ValueError(f"unknown refit {self.refit!r}; choose from {list(REFITS)}")
        if not 0.0 <= self.balance <= 1.0:
            raise ValueError(f"balance must be in [0, 1], got {self.balance}")
        for field_name in ("shrink", "shrink_text"):
            value = getattr(self, field_name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field_name} (the Gram's shrinkage) must be in [0, 1], got {value}")
        if self.blocksize < 1 or self.damp < 0 or self.refit_iters < 0 or self.refit_tol < 0:
            raise ValueError("blocksize must be >= 1 and damp, refit_iters, refit_tol >= 0")
        if not self.remainder_damp >= 0:  # also refuses NaN
            raise ValueError(f"remainder_damp must be >= 0, got {self.remainder_damp}")
        if not self.dense_damp >= 0:
            raise ValueError(f"dense_damp must be >= 0, got {self.dense_damp}")
        if self.block_refine_steps < 0 or self.block_refine_calls < 1 or not self.block_refine_lr > 0:
            raise ValueError(
                "block_refine_steps must be >= 0, block_refine_calls >= 1 and block_refine_lr > 0, got "
                f"{self.block_refine_steps}, {self.block_refine_calls}, {self.block_refine_lr}"
            )
        if self.block_refine_step not in REFINE_STEPS:
            raise ValueError(
                f"unknown block_refine_step {self.block_refine_step!r}; choose from {list(REFINE_STEPS)}"
            )
        if not 0.0 <= self.block_refine_holdout < 1.0:
            raise ValueError(f"block_refine_holdout must be in [0, 1), got {self.block_refine_holdout}")
        if self.block_refine_patience < 0:
            raise ValueError(
                "block_refine_patience must be >= 0 (0: refine every block), "
                f"got {self.block_refine_patience}"
            )


#: ``progress(done, total, layer_name)``
ProgressFn = Callable[[int, int, str], None]


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); ``"unstructured"`` -> None."""
    if pattern == "unstructured":
        return None
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; choose from {list(PATTERNS)}")
    n, m = pattern.split(":")
    return int(n), int(m)


def pattern_sparsity(sparsity: float, pattern: str) -> float:
    """The sparsity a pattern prunes: ``1 - N/M`` for an N:M pattern (it fixes it), else ``sparsity``."""
    nm = parse_pattern(pattern)
    return sparsity if nm is None else 1 - nm[0] / nm[1]


def chosen_families(chosen: Mapping[str, bool]) -> tuple[str, ...]:
    """The families to prune for a user's on/off choice of named families (``{"attention": True,
    ...}``), plus ``block_linear``: the block Linears of DiTs without named families (the generic
    template), which no named family covers and which a user who picks families means too.

    Raises:
        ValueError: a name that is no family.
    """
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown layer families {unknown}; choose from {list(FAMILIES)}")
    return (*[family for family, on in chosen.items() if on], "block_linear")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. The defaults are DiT-Pruning as chosen by the quality benchmark.

    Attributes:
        sparsity: fraction of weights removed in every selected layer, in [0, 1). For an N:M
            pattern it must equal ``1 - N/M`` (0.5 for 2:4 and 4:8). 0 is **quantise only** and needs
            ``value_bits``: nothing is pruned, every selected layer is quantised whole
            (:func:`~ditprune_core.sequential.prune_sequential_`; with ``update="obs"`` by the same
            OBS sweep as the kept values of a pruned layer, on a mask that keeps every weight) and
            stored with no mask (the dense layout).
        metric: ``magnitude``, ``wanda``, ``ria`` or ``energy``.
        granularity: comparison group: ``layer``, ``row`` (output channel), ``column`` (input
            channel) or ``cluster``. Ignored by N:M patterns, whose groups are M inputs of a row.
        pattern: ``unstructured``, ``2:4`` or ``4:8`` (groups along the input dimension).
        metric_params: parameters of the metric (energy balance, row normalisation, RIA power).
        cluster_params: parameters of the cluster granularity.
        families: layer families to prune (default :data:`~ditprune_core.layers.DEFAULT_FAMILIES`).
        layer_regex: only layers whose name matches this regular expression (``re.search``).
        update: ``"none"`` (mask only) or ``"obs"``: reconstruction, which also updates the kept
            weights from each layer's input Gram (:func:`~ditprune_core.sequential.prune_sequential_`).
        reconstruct: how ``update="obs"`` reconstructs.
        value_bits: None (kept values stay in the model's dtype) or 8, 4, 3
            (:data:`~ditprune_core.quantize.VALUE_BITS`; also 2 when quantising only, with the
            dense defaults :data:`~ditprune_core.quantize.DEFAULT_DENSE_SPECS`): the kept values of
            every pruned layer are quantised to that many bits, in groups, with the measured defaults
            :data:`~ditprune_core.quantize.DEFAULT_VALUE_SPECS` (groups of 128 kept values,
            asymmetric at 8 and 4 bits, symmetric at 3). With ``update="obs"`` the rounding is
            chosen inside an OBS pass that compensates it (:func:`~ditprune_core.reconstruct.obs_quantize`);
            without, round to nearest. Only :func:`~ditprune_core.sequential.prune_sequential_` quantises.
        value_spec: an explicit :class:`~ditprune_core.quantize.QuantSpec` (group size, symmetry,
            grouping) instead of the default of ``value_bits``; its bits must be ``value_bits``
            (``value_bits`` may be left None: it is taken from the spec).
        upgrade_share: mixed precision (ours): this share of the selected layers' weights, in whole
            layers, is stored at ``upgrade_bits`` instead of ``value_bits`` (0, the default: none).
            :func:`~ditprune_core.sequential.prune_sequential_` picks the layers whose rounding at
            ``value_bits`` costs most per weight (:func:`~ditprune_core.reconstruct.allocate_upgrades`).
            Needs ``value_bits`` and its default spec.
        upgrade_layers: mixed precision by name: the selected layers whose name this regular
            expression finds (``re.search``) are stored at ``upgrade_bits``, e.g.
            :data:`UPGRADE_ATTENTION`. Instead of ``upgrade_share``, not with it.
        upgrade_bits: the bits of the upgraded layers (default 4), above ``value_bits``.
        remainder_bits: the remainder reconstructed too (ours): the block layers that are not
            selected (FLUX's and SD3's modulation, :func:`~ditprune_core.layers.remainder_layers`)
            are quantised in the same passes, each by GPTQ on its own input Gram (dampened by
            ``reconstruct.remainder_damp``), to the codes Save Pruned Model's remainder
            ``"int{bits}"`` stores (:data:`~ditprune_core.quantize.DEFAULT_DENSE_SPECS`: 4-bit
            asymmetric or 3-bit symmetric groups of 128), instead of being rounded to nearest when
            saved. None (the default): the remainder is left as it is. Needs ``update="obs"``.
        filter_fn: optional ``filter_fn(module, name) -> bool``, applied last; not serialised.
    """

    sparsity: float = 0.5
    metric: str = "energy"
    granularity: str = "layer"
    pattern: str = "unstructured"
    metric_params: MetricParams = field(default_factory=MetricParams)
    cluster_params: ClusterParams = field(default_factory=ClusterParams)
    families: tuple[str, ...] = DEFAULT_FAMILIES
    layer_regex: str | None = None
    update: str = "none"
    reconstruct: ReconstructParams = field(default_factory=ReconstructParams)
    value_bits: int | None = None
    value_spec: QuantSpec | None = None
    upgrade_share: float = 0.0
    upgrade_bits: int = 4
    upgrade_layers: str | None = None
    remainder_bits: int | None = None
    filter_fn: LayerFilter | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.sparsity, bool)
            or not isinstance(self.sparsity, (int, float))
            or not 0.0 <= float(self.sparsity) < 1.0
        ):
            raise ValueError(
                "sparsity must be strictly between 0 and 1 to prune, or 0 with value_bits to quantise "
                f"only; got {self.sparsity!r}"
            )
        check_metric(self.metric)
        if self.update not in UPDATES:
            raise ValueError(f"unknown update {self.update!r}; choose from {list(UPDATES)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose from {list(GRANULARITIES)}")
        nm = parse_pattern(self.pattern)
        if nm is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(
                f"pattern {self.pattern} prunes exactly {1 - nm[0] / nm[1]:.0%} of every layer; set "
                f"sparsity={1 - nm[0] / nm[1]} (got {self.sparsity})"
            )
        object.__setattr__(self, "families", tuple(self.families))
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown layer families {unknown}; choose from {list(FAMILIES)}")
        if not self.families:
            raise ValueError("families is empty: choose at least one layer family to prune")
        if self.layer_regex is not None:
            try:
                re.compile(self.layer_regex)
            except re.error as exc:
                raise ValueError(
                    f"layer_regex {self.layer_regex!r} is not a valid regular expression: {exc}"
                ) from exc

        self._check_values()
        self._check_upgrade()
        self._check_remainder()
        if self.sparsity == 0 and self.value_bits is None:
            raise ValueError(
                "sparsity must be strictly between 0 and 1 to prune; sparsity 0 prunes nothing: give "
                "value_bits (or value_spec) to quantise the layers without pruning them (quantise only)"
            )

    def _check_values(self) -> None:
        bits, spec = self.value_bits, self.value_spec
        if spec is not None and not isinstance(spec, QuantSpec):
            raise ValueError(f"value_spec must be a QuantSpec or None, got {type(spec).__name__}")
        if bits is None and spec is not None:
            bits = spec.bits
            object.__setattr__(self, "value_bits", bits)
        if bits is None:
            return
        allowed = DENSE_VALUE_BITS if self.sparsity == 0 else VALUE_BITS
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
            raise ValueError(
                f"value_bits must be None or one of {list(allowed)} (got {bits!r}): the kept values of a "
                "pruned layer are quantised to 8, 4 or 3 bits; 2 bits is only offered for dense baselines "
                "(quantise only: sparsity 0; or quantize.gptq_quantize)"
            )
        if spec is not None and spec.bits != bits:
            raise ValueError(
                f"value_spec has {spec.bits} bits but value_bits is {bits}: give one of them, or make them "
                "agree"
            )

    def _check_upgrade(self) -> None:
        share, bits = self.upgrade_share, self.upgrade_bits
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= float(share) < 1.0:
            raise ValueError(
                f"upgrade_share must be in [0, 1): the share of the layers' weights stored at upgrade_bits "
                f"(0: none); got {share!r}"
            )
        regex = self.upgrade_layers
        if regex is not None:
            if share:
                raise ValueError(
                    "give upgrade_share (the layers chosen by estimate) or upgrade_layers (by name), not both"
                )
            try:
                re.compile(regex)
            except (re.error, TypeError) as exc:
                raise ValueError(
                    f"upgrade_layers {regex!r} is not a valid regular expression: {exc}"
                ) from exc
        if share == 0 and regex is None:
            return
        what = f"upgrade_share {share}" if share else f"upgrade_layers {regex!r}"
        if self.value_bits is None:
            raise ValueError(
                f"{what} stores some layers at upgrade_bits instead of value_bits, but value_bits is None: "
                "give value_bits (e.g. 3), or no upgrade"
            )
        if self.value_spec is not None:
            raise ValueError(
                f"{what} upgrades layers from value_bits' default spec to upgrade_bits' default spec; a "
                "custom value_spec has no upgraded twin: drop value_spec, or the upgrade"
            )
        allowed = DENSE_VALUE_BITS if self.sparsity == 0 else VALUE_BITS
        if isinstance(bits, bool) or not isinstance(bits, int) or not self.value_bits < bits in allowed:
            above = [b for b in allowed if b > self.value_bits]
            raise ValueError(
                f"upgrade_bits must be above value_bits {self.value_bits}, one of {above}; got {bits!r}"
            )

    def _check_remainder(self) -> None:
        bits = self.remainder_bits
        if bits is None:
            return
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in REMAINDER_CODE_BITS:
            raise ValueError(
                f"remainder_bits must be None or one of {list(REMAINDER_CODE_BITS)} (Save Pruned Model's "
                f"remainder int8 / int4 / int3), got {bits!r}"
            )
        if self.update != "obs":
            raise ValueError(
                f"remainder_bits {bits} quantises the remainder by GPTQ on its calibration Grams, which "
                f"needs update='obs' (got update={self.update!r}); without it, leave remainder_bits None "
                "and choose the remainder when saving (round to nearest)"
            )

    def upgraded(self) -> PruneConfig:
        """This config for an upgraded layer (``upgrade_share`` or ``upgrade_layers``): its values at
        ``upgrade_bits``."""
        return replace(self, value_bits=self.upgrade_bits, upgrade_share=0.0, upgrade_layers=None)

    @property
    def upgrades(self) -> bool:
        """Mixed precision: some layers are stored at ``upgrade_bits``."""
        return bool(self.upgrade_share) or self.upgrade_layers is not None

    @property
    def needs_calibration(self) -> bool:
        return needs_calibration(self.metric)

    @property
    def quantize_only(self) -> bool:
        """Sparsity 0 with ``value_bits``: every selected layer is quantised whole, nothing pruned (no
        mask; a file stores it in the dense layout, codes and scales only)."""
        return self.sparsity == 0

    @property
    def value_quant(self) -> QuantSpec | None:
        """The :class:`~ditprune_core.quantize.QuantSpec` of the kept values, or None (unquantised)."""
        if self.value_bits is None:
            return None
        if self.value_spec is not None:
            return self.value_spec
        defaults = DEFAULT_DENSE_SPECS if self.quantize_only else DEFAULT_VALUE_SPECS
        return defaults[self.value_bits]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``filter_fn`` excluded)."""
        out = asdict(self)
        out.pop("filter_fn")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneConfig:
        data = dict(data)
        data["metric_params"] = MetricParams(**data.get("metric_params", {}))
        data["cluster_params"] = ClusterParams(**data.get("cluster_params", {}))
        data["reconstruct"] = ReconstructParams(**data.get("reconstruct", {}))
        if data.get("value_spec") is not None:
            data["value_spec"] = QuantSpec(**data["value_spec"])
        if "families" in data:
            data["families"] = tuple(data["families"])
        return cls(**data)
