"""Time and memory of the OBS reconstruction on FLUX.1-dev-width layers, against the mask-only pass.

    python -m bench obsspeed                 # writes docs/bench/obs_speed.md
    python -m bench obsspeed --quick         # widths / 4 -> docs/bench/obs_speed_quick.md
    python -m bench obsspeed --device cuda   # -> docs/bench/obs_speed_cuda.md

``--threads N`` sets torch's CPU threads for the run. The committed figures use ``--threads 1``: on
a 2-core machine shared with other jobs, two threads spent most of the small-tensor operations of
the mask-only pass waiting on each other (4x slower than one thread), which would skew the ratios.

Four layers at FLUX.1-dev width (hidden 3072, MLP 12288), shapes from
:func:`~ditprune_core.dit_shapes.flux_shapes`: ``single_blocks.0.linear1`` (21504 x 3072),
``single_blocks.0.linear2`` (3072 x 15360), ``double_blocks.0.img_attn.qkv`` (9216 x 3072) and
``double_blocks.0.img_mlp.2`` (3072 x 12288). For each, in one process and one run:

- ``mask``: the mask-only pass, :func:`~ditprune_core.mask.layer_keep_mask` with ``PruneConfig(0.5)``
  on ``diag(H)``, and the mask applied to a copy of the weight;
- ``obs``: :func:`~ditprune_core.reconstruct.obs_prune` with the defaults of
  ``PruneConfig(0.5, update="obs").reconstruct`` (mask inside the update, β, blocksize, damp), as
  :func:`~ditprune_core.reconstruct.reconstruct_layer` calls it;
- ``pcg-k``: :func:`~ditprune_core.reconstruct.refit_masked` by PCG, warm-started from the OBS
  result, forced to run ``k`` iterations (tolerance 0); counts whose predicted time, from the
  first two counts' linear model ``setup + k · per-iteration``, exceeds a limit are extrapolated
  by that model instead of run;
- ``exact``: the per-row exact refit, run on the whole layer only where it fits a flop budget,
  else on its first rows and scaled to all rows (its cost is linear in the rows).

Times are ratios to the same layer's mask-only pass; memory is the peak extra resident memory (or
CUDA memory) of each call, as a multiple of the layer's Gram and of the largest layer's Gram. The
extrapolation to FLUX.1-dev takes every prunable layer of the default families (19 double blocks x
img/txt x qkv, proj, mlp.0, mlp.2; 38 single blocks x linear1, linear2): a layer whose shape was
measured gets its time, the others (``attn.proj`` 3072 x 3072, ``mlp.0`` 12288 x 3072) a line
``a + b · out`` fitted through the measured layers with the same number of inputs (every cost here
is an ``in``-only part plus a part linear in ``out`` for a fixed ``in``).
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from ditprune_core.config import PruneConfig
from ditprune_core.dit_shapes import FLUX_DEV, flux_shapes
from ditprune_core.layers import DEFAULT_FAMILIES, FLUX
from ditprune_core.mask import layer_keep_mask
from ditprune_core.reconstruct import obs_prune, refit_masked
from ditprune_core.stats import GramAccumulator

from . import write_report
from .memprobe import PeakRSS
from .speed import limit_malloc_caching

__all__ = [
    "MEASURED_LAYERS",
    "FluxGroup",
    "LayerResult",
    "Measurement",
    "ObsSpeedResult",
    "flux_prunable_shapes",
    "format_obs_speed",
    "run_obs_speed",
    "synthetic_gram",
    "write_obs_speed",
]

log = logging.getLogger("ditprune")

HIDDEN, HEADS = FLUX_DEV["hidden"], FLUX_DEV["heads"]
DOUBLE_BLOCKS, SINGLE_BLOCKS = FLUX_DEV["depth"], FLUX_DEV["depth_single"]
#: the four layers measured, by their FLUX.1-dev names
MEASURED_LAYERS = (
    "single_blocks.0.linear1",
    "single_blocks.0.linear2",
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.img_mlp.2",
)
#: an exact refit runs on the whole layer when its Cholesky flops (out · in³ / 3) fit this, else
#: on ``budget / (in³ / 3)`` rows (at least one)
EXACT_FLOP_BUDGET = 4e10
T = TypeVar("T")


@dataclass(frozen=True)
class Measurement:
    """One method on one layer.

    Attributes:
        seconds: for the whole layer (measured, or extrapolated / estimated as ``how`` says).
        peak_extra_bytes: peak memory above what was allocated before the call; None if not run.
        how: ``"measured"``, ``"extrapolated: …"`` or ``"estimated: …"``.
        detail: e.g. the PCG residual after the iterations run.
    """

    seconds: float
    peak_extra_bytes: int | None
    how: str = "measured"
    detail: str = ""

    @property
    def measured(self) -> bool:
        return self.how == "measured"


@dataclass(frozen=True)
class LayerResult:
    """All methods on one layer (``out_features`` x ``in_features``); keys of ``methods`` are
    ``"mask"``, ``"obs"``, ``"pcg-k"`` and ``"exact"``."""

    name: str
    out_features: int
    in_features: int
    methods: dict[str, Measurement]

    @property
    def gram_bytes(self) -> int:
        return GramAccumulator.nbytes(self.in_features)

    def ratio(self, method: str) -> float:
        """Seconds of ``method`` over the mask-only pass of the same layer."""
        return self.methods[method].seconds / self.methods["mask"].seconds


@dataclass(frozen=True)
class FluxGroup:
    """The FLUX.1-dev prunable layers of one shape, and their extrapolated seconds per layer.

    Attributes:
        out_features, in_features: the shape.
        names: the layer names with the block index replaced by ``N`` (img/txt collapsed).
        count: how many layers of FLUX.1-dev have this shape.
        seconds: per layer, by method.
        how: per method, ``"measured <name>"``, ``"fit a + b·out over …"`` or ``"∝ out from …"``.
    """

    out_features: int
    in_features: int
    names: tuple[str, ...]
    count: int
    seconds: dict[str, float]
    how: dict[str, str]


@dataclass
class ObsSpeedResult:
    """Everything :func:`format_obs_speed` writes; ``totals`` are ``Σ count · seconds`` per method."""

    layers: list[LayerResult]
    groups: list[FluxGroup]
    totals: dict[str, float]
    methods: list[str]
    default_refit: dict[int, str]
    width_divisor: int
    tokens: int
    device: str
    wall_seconds: float
    threads: int
    load_average: tuple[float, float] = (0.0, 0.0)
    config: PruneConfig = field(default_factory=lambda: PruneConfig(0.5, update="obs"))
    pcg_limit_s: float = 60.0

    @property
    def largest_gram_bytes(self) -> int:
        return max(layer.gram_bytes for layer in self.layers)

    def default_seconds(self, group: FluxGroup) -> float:
        """One layer of ``group`` with ``update="obs"`` defaults: OBS plus the ``auto`` refit."""
        return group.seconds["obs"] + group.seconds[self.default_refit[group.in_features]]

    @property
    def default_total(self) -> float:
        return sum(g.count * self.default_seconds(g) for g in self.groups)


def flux_prunable_shapes(hidden: int = HIDDEN, heads: int = HEADS) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of every FLUX.1-dev Linear in the default families (228 at full width)."""
    shapes = flux_shapes(hidden=hidden, heads=heads, depth=DOUBLE_BLOCKS, depth_single=SINGLE_BLOCKS)
    out: dict[str, tuple[int, int]] = {}
    for name in shapes.linears:
        if FLUX.family_of(name) in DEFAULT_FAMILIES:
            o, i = shapes.shapes[name + ".weight"]
            out[name] = (o, i)
    return out


def synthetic_gram(
    in_features: int,
    *,
    tokens: int = 4096,
    rank: int = 32,
    outliers: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    chunk: int = 512,
) -> torch.Tensor:
    """A Gram (in, in) float32 of correlated synthetic activations, accumulated by GramAccumulator.

    Each token ``x = s ⊙ (z B / √rank + 0.3 n)``: a shared low-rank part (``z`` (rank,), ``B``
    (rank, in) standard normal), isotropic noise ``n``, log-normal channel scales
    ``s = exp(0.5 N(0, 1))`` and ``outliers`` channels scaled 20x more (DiT-like outlier channels).
    """
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, in_features, generator=gen) / rank**0.5
    scale = torch.randn(in_features, generator=gen).mul(0.5).exp()
    scale[torch.randperm(in_features, generator=gen)[:outliers]] *= 20.0
    acc = GramAccumulator(in_features, name=f"synthetic {in_features}")
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        x = torch.randn(n, rank, generator=gen) @ basis + 0.3 * torch.randn(n, in_features, generator=gen)
        acc.add_batch((x * scale).to(device))
    return acc.finalize()


class _PeakMemory:
    """Peak extra memory of one call: resident memory on CPU (:class:`PeakRSS`), allocated on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rss = PeakRSS() if device.type == "cpu" else None
        self._before = 0

    def reset(self) -> None:
        if self._rss is not None:
            self._before = self._rss.reset()
        else:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)

    def peak_extra(self) -> int:
        if self._rss is not None:
            return max(0, self._rss.peak() - self._before)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self._before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable[[], T], device: torch.device) -> tuple[T, float, int]:
    """``(fn(), seconds, peak extra bytes)``; the result stays alive in the peak."""
    probe = _PeakMemory(device)
    probe.reset()
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    return result, seconds, probe.peak_extra()


def _exact_rows(out_f: int, in_f: int, budget: float) -> int:
    per_row = in_f**3 / 3
    return out_f if out_f * per_row <= budget else max(1, min(out_f, int(budget / per_row)))


def measure_layer(
    name: str,
    out_f: int,
    in_f: int,
    *,
    config: PruneConfig,
    pcg_iters: Sequence[int],
    tokens: int,
    device: torch.device,
    seed: int = 0,
    pcg_limit_s: float = 60.0,
    exact_flop_budget: float = EXACT_FLOP_BUDGET,
) -> LayerResult:
    """Build one random layer and its Gram, then time every method on it (see the module docstring).

    Args:
        name: layer name (the Gram and weight seeds do not depend on it).
        out_f, in_f: the shape.
        config: ``update="obs"`` config whose ``reconstruct`` gives the OBS and refit settings.
        pcg_iters: PCG iteration counts, increasing, at least two; the first two always run.
    """
    params = config.reconstruct
    mask_config = PruneConfig(config.sparsity)
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(out_f, in_f, generator=gen).mul_(0.02).to(device, torch.bfloat16)
    gram = synthetic_gram(in_f, tokens=tokens, seed=seed, device=device)
    w32 = weight.to(torch.float32)
    activation_sq_mean = gram.diagonal().to(torch.float64).clamp_min(0.0)
    methods: dict[str, Measurement] = {}

    def mask_pass() -> torch.Tensor:
        keep = layer_keep_mask(name, weight, activation_sq_mean, mask_config)
        return weight.masked_fill(~keep, 0.0)

    def timed_mask() -> None:
        pruned, seconds, peak = _measure(mask_pass, device)
        del pruned
        old = methods.get("mask")
        if old is not None:
            seconds, peak = min(seconds, old.seconds), max(peak, old.peak_extra_bytes or 0)
        methods["mask"] = Measurement(seconds, peak, detail="best of 2, before and after the updates")

    timed_mask()
    sparsity = float(config.sparsity)
    (obs_weight, keep), seconds, peak = _measure(
        lambda: obs_prune(
            w32,
            gram,
            sparsity=sparsity,
            balance=params.balance,
            granularity="row" if config.granularity == "row" else "layer",
            blocksize=params.blocksize,
            damp=params.damp,
            name=name,
        ),
        device,
    )
    methods["obs"] = Measurement(seconds, peak)
    log.info("%s: mask %.2f s, obs %.2f s", name, methods["mask"].seconds, seconds)
    per_iter = setup = 0.0
    for index, k in enumerate(pcg_iters):
        predicted = setup + k * per_iter
        if index >= 2 and predicted > pcg_limit_s:
            last = methods[f"pcg-{pcg_iters[1]}"]
            methods[f"pcg-{k}"] = Measurement(
                predicted,
                last.peak_extra_bytes,
                f"extrapolated: setup + {k} x per-iteration from pcg-{pcg_iters[0]} and pcg-{pcg_iters[1]}",
                f"predicted {predicted:.0f} s > {pcg_limit_s:.0f} s limit; memory: pcg-{pcg_iters[1]}'s "
                "(fixed buffers)",
            )
            continue
        pcg = partial(
            refit_masked, w32, gram, keep, init=obs_weight, method="pcg", damp=params.damp, name=name
        )
        (refit, info), seconds, peak = _measure(partial(pcg, iters=k, tol=0.0), device)
        del refit
        detail = f"{info.iterations} iterations, residual {info.residual:.1e}"
        if index >= 2:
            detail += f"; linear model predicted {predicted:.2f} s"
        methods[f"pcg-{k}"] = Measurement(seconds, peak, detail=detail)
        if index == 1:
            k0, t0 = pcg_iters[0], methods[f"pcg-{pcg_iters[0]}"].seconds
            per_iter = (seconds - t0) / (k - k0)
            if per_iter <= 0:  # noise: charge every iteration the same
                per_iter = seconds / k
            setup = max(0.0, seconds - k * per_iter)
        log.info("%s: pcg-%d %.2f s (%s)", name, k, seconds, detail)
    rows = _exact_rows(out_f, in_f, exact_flop_budget)
    exact = partial(refit_masked, w32[:rows], gram, keep[:rows], method="exact", damp=params.damp, name=name)
    (refit, info), seconds, peak = _measure(exact, device)
    del refit
    if rows == out_f:
        methods["exact"] = Measurement(seconds, peak, detail=f"residual {info.residual:.1e}")
    else:
        methods["exact"] = Measurement(
            seconds * out_f / rows,
            peak + 2 * 4 * (out_f - rows) * in_f,
            f"estimated: {rows} of {out_f} rows, x {out_f / rows:.4g}",
            f"{seconds / rows:.2f} s per row; memory: measured on {rows} rows + right-hand side and "
            "solution of the other rows",
        )
    log.info("%s: exact %s", name, methods["exact"].how)
    timed_mask()
    return LayerResult(name, out_f, in_f, methods)


def _fit_out(points: Sequence[tuple[int, float]], out_f: int) -> tuple[float, str]:
    """Seconds at ``out_f`` from ``(out, seconds)`` points of one input size: least-squares line
    ``a + b · out`` (``a, b ≥ 0``), else proportional to ``out`` through the origin."""
    outs = [o for o, _ in points]
    if len(set(outs)) >= 2:
        mo = sum(outs) / len(outs)
        mt = sum(t for _, t in points) / len(points)
        b = sum((o - mo) * (t - mt) for o, t in points) / sum((o - mo) ** 2 for o in outs)
        a = mt - b * mo
        if a >= 0 and b >= 0:
            return a + b * out_f, "fit a + b·out"
    b = sum(o * t for o, t in points) / sum(o * o for o in outs)
    return b * out_f, "∝ out"


def _collapse(name: str) -> str:
    parts = name.split(".")
    parts[1] = "N"
    return re.sub(r"(img|txt)_", "{img,txt}_", ".".join(parts))


def extrapolate(
    layers: Sequence[LayerResult], shapes: dict[str, tuple[int, int]], methods: Sequence[str]
) -> list[FluxGroup]:
    """Group ``shapes`` by (out, in) and give each group per-layer seconds from ``layers``.

    Raises:
        ValueError: a shape whose input size no measured layer has (naming it).
    """
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes.items():
        by_shape.setdefault(shape, []).append(name)
    groups = []
    for (out_f, in_f), names in by_shape.items():
        same_in = [layer for layer in layers if layer.in_features == in_f]
        if not same_in:
            raise ValueError(
                f"no measured layer has {in_f} inputs, as {names[0]!r} ({out_f} x {in_f}) does; "
                "measure one of that input size"
            )
        exact = [layer for layer in same_in if layer.out_features == out_f]
        seconds, how = {}, {}
        for method in methods:
            if exact:
                seconds[method], how[method] = exact[0].methods[method].seconds, f"measured {exact[0].name}"
            else:
                points = [(layer.out_features, layer.methods[method].seconds) for layer in same_in]
                seconds[method], rule = _fit_out(points, out_f)
                how[method] = f"{rule} over {', '.join(layer.name.rsplit('.', 1)[-1] for layer in same_in)}"
        unique = tuple(dict.fromkeys(_collapse(n) for n in names))
        groups.append(FluxGroup(out_f, in_f, unique, len(names), seconds, how))
    return groups


def run_obs_speed(
    *,
    width_divisor: int = 1,
    tokens: int = 4096,
    pcg_iters: Sequence[int] = (1, 5, 20),
    device: torch.device | str = "cpu",
    pcg_limit_s: float = 60.0,
    exact_flop_budget: float = EXACT_FLOP_BUDGET,
    seed: int = 0,
    threads: int | None = None,
) -> ObsSpeedResult:
    """Measure :data:`MEASURED_LAYERS` at FLUX.1-dev width / ``width_divisor`` and extrapolate.

    Args:
        width_divisor: 1 for FLUX.1-dev (hidden 3072), 4 for the quick run, larger for tests.
        tokens: calibration tokens of each synthetic Gram.
        pcg_iters: PCG iteration counts (increasing, at least two); the refit default
            (``refit_iters``, 20) is added if missing.
        device: where the tensors live (``"cpu"`` or ``"cuda"``).
        pcg_limit_s: PCG counts after the first two whose predicted time exceeds this are
            extrapolated instead of run.
        threads: torch CPU threads for the run (restored after it); None keeps torch's default.
    Raises:
        ValueError: a width that does not divide FLUX's, too few PCG counts, or no CUDA device.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(
            width_divisor, tokens, pcg_iters, torch.device(device), pcg_limit_s, exact_flop_budget, seed
        )
    finally:
        torch.set_num_threads(previous)


def _run(
    width_divisor: int,
    tokens: int,
    pcg_iters: Sequence[int],
    dev: torch.device,
    pcg_limit_s: float,
    exact_flop_budget: float,
    seed: int,
) -> ObsSpeedResult:
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; run on cpu or on a GPU machine")
    if width_divisor < 1 or HIDDEN % width_divisor:
        raise ValueError(f"width divisor {width_divisor} does not divide FLUX.1-dev's hidden size {HIDDEN}")
    config = PruneConfig(0.5, update="obs")
    iters = sorted(set(pcg_iters) | {config.reconstruct.refit_iters})
    if len(iters) < 2 or iters[0] < 1:
        raise ValueError(f"pcg_iters needs at least two counts >= 1, got {list(pcg_iters)}")
    start, load_start = time.perf_counter(), _load_average()
    if dev.type == "cpu":
        log.info("obsspeed: %s", limit_malloc_caching())
    hidden = HIDDEN // width_divisor
    shapes = flux_prunable_shapes(hidden, HEADS if hidden % HEADS == 0 else 1)
    # warm-up: kernels, thread pools and first allocations outside the measurements
    measure_layer("warm-up", 64, 64, config=config, pcg_iters=iters[:2], tokens=128, device=dev, seed=seed)
    layers = []
    for name in MEASURED_LAYERS:
        out_f, in_f = shapes[name]
        layers.append(
            measure_layer(
                name,
                out_f,
                in_f,
                config=config,
                pcg_iters=iters,
                tokens=tokens,
                device=dev,
                seed=seed,
                pcg_limit_s=pcg_limit_s,
                exact_flop_budget=exact_flop_budget,
            )
        )
    methods = ["mask", "obs", *(f"pcg-{k}" for k in iters), "exact"]
    groups = extrapolate(layers, shapes, methods)
    totals = {m: sum(g.count * g.seconds[m] for g in groups) for m in methods}
    params = config.reconstruct
    default_refit = {
        g.in_features: "exact" if g.in_features <= params.exact_max_in else f"pcg-{params.refit_iters}"
        for g in groups
    }
    return ObsSpeedResult(
        layers,
        groups,
        totals,
        methods,
        default_refit,
        width_divisor,
        tokens,
        str(dev),
        time.perf_counter() - start,
        torch.get_num_threads(),
        (load_start, _load_average()),
        config,
        pcg_limit_s,
    )


def _load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _mark(m: Measurement) -> str:
    return "" if m.measured else (" *" if m.how.startswith("extrapolated") else " †")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def format_obs_speed(result: ObsSpeedResult, command: str) -> str:
    """The markdown report of :func:`run_obs_speed`."""
    params = result.config.reconstruct
    refits = [m for m in result.methods if m not in ("mask", "obs")]
    largest = result.largest_gram_bytes
    largest_name = max(result.layers, key=lambda layer: layer.gram_bytes).name
    width = HIDDEN // result.width_divisor
    scope = "FLUX.1-dev width" if result.width_divisor == 1 else f"FLUX.1-dev width / {result.width_divisor}"
    lines = [
        "# OBS update and refit: time and memory against the mask-only pass (generated)",
        "",
        f"Command: `{command}`. Written by `bench/obs_speed.py` in {_duration(result.wall_seconds)}.",
        f"Machine: {platform.machine()}, {result.threads} torch thread(s), torch {torch.__version__}, "
        f"device {result.device}, {os.cpu_count()} cores; 1-minute load average "
        f"{result.load_average[0]:.1f} at the start, {result.load_average[1]:.1f} at the end (other jobs "
        "share the machine: absolute seconds and, less so, the ratios move with the load).",
        "",
        f"Layers at {scope} (hidden {width}, MLP {4 * width}), weights N(0, 0.02²) in bf16. Each Gram "
        f"(float32) is accumulated by `GramAccumulator` from {result.tokens} synthetic tokens "
        "`x = s ⊙ (z B / √32 + 0.3 n)`: a shared rank-32 part, isotropic noise, log-normal channel "
        "scales `s = exp(0.5 N(0, 1))` and 8 outlier channels 20x larger (the times of the "
        "factorizations and products do not depend on the values).",
        "",
        "- **mask**: `layer_keep_mask` with `PruneConfig(0.5)` (energy, layer-wise) on `diag(H)`, and the "
        "mask applied to a copy; best of two runs, one before and one after the updates.",
        f'- **obs**: `obs_prune` with `PruneConfig(0.5, update="obs").reconstruct`\'s defaults: mask '
        f"{params.mask}, β = {params.balance}, blocksize {params.blocksize}, damp {params.damp}.",
        '- **pcg-k**: `refit_masked(method="pcg")` warm-started from the OBS result, forced to k '
        "iterations (tol 0; the default tol 1e-4 stops earlier only if every row converges). "
        f"Counts marked * were not run: their predicted time exceeded {result.pcg_limit_s:.0f} s, so they "
        "are `setup + k x per-iteration` from the first two counts (each iteration is one "
        "(out, in) x (in, in) product, the setup two).",
        '- **exact**: `refit_masked(method="exact")`, one Cholesky of the row\'s masked (in, in) system per '
        "row (out · in³ / 3 flops). Marked †: run on the first rows only and scaled to all rows (its "
        "cost is linear in the rows); infeasible to run whole at this width.",
        "",
        "Memory: peak extra "
        + (
            "resident memory (kernel high-water mark, glibc mmap threshold 64 KiB)"
            if result.device == "cpu"
            else "CUDA memory allocated"
        )
        + " during the call, above what was allocated before it (the weight, its Gram, the OBS result), "
        f"as a multiple of the layer's own Gram (in² x 4 bytes) and of the largest Gram here "
        f"({largest / 2**20:.0f} MiB, {largest_name}).",
        "",
        "## Time per layer, as a multiple of the mask-only pass",
        "",
        "| layer | out x in | mask s | " + " | ".join(["obs", *refits]) + " |",
        "|---|---|---|" + "---|" * (1 + len(refits)),
    ]
    for layer in result.layers:
        cells = [f"{layer.ratio(m):.1f}{_mark(layer.methods[m])}" for m in ["obs", *refits]]
        lines.append(
            f"| {layer.name} | {layer.out_features} x {layer.in_features} | "
            f"{layer.methods['mask'].seconds:.2f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## Peak extra memory: multiple of the layer's Gram / of the largest Gram",
        "",
        "| layer | Gram MiB | " + " | ".join(["mask", "obs", *refits]) + " |",
        "|---|---|" + "---|" * (2 + len(refits)),
    ]
    for layer in result.layers:
        cells = []
        for m in ["mask", "obs", *refits]:
            peak = layer.methods[m].peak_extra_bytes or 0
            cells.append(f"{peak / layer.gram_bytes:.2f} / {peak / largest:.2f}{_mark(layer.methods[m])}")
        lines.append(f"| {layer.name} | {layer.gram_bytes / 2**20:.3g} | " + " | ".join(cells) + " |")
    worst = max(
        (layer.methods[m].peak_extra_bytes or 0, layer.name, m)
        for layer in result.layers
        for m in result.methods
        if m != "exact"
    )
    lines += [
        "",
        f"Largest peak outside the exact refit: {worst[0] / 2**20:.0f} MiB ({worst[2]} on {worst[1]}), "
        f"{worst[0] / largest:.2f}x the largest Gram.",
        "",
        "## Details",
        "",
    ]
    for layer in result.layers:
        for m, meas in layer.methods.items():
            text = "; ".join(t for t in (meas.how if not meas.measured else "", meas.detail) if t)
            if text and m != "mask":
                lines.append(f"- {layer.name} {m}: {text}.")
    lines += [
        "",
        f"## Extrapolated to all of {'FLUX.1-dev' if result.width_divisor == 1 else scope} on this "
        + ("CPU" if result.device == "cpu" else "device"),
        "",
        f"Every prunable layer of the default families ({sum(g.count for g in result.groups)} layers). "
        "Seconds per layer: the measured layer of the same shape, or a line `a + b·out` through the "
        "measured layers of the same input size (for a fixed `in` every method costs an `in`-only part "
        "— the factorizations of the OBS update — plus a part linear in `out`).",
        "",
        "| shape (out x in) | layers | count | from | " + " | ".join(result.methods) + " |",
        "|---|---|---|---|" + "---|" * len(result.methods),
    ]
    for g in result.groups:
        sources = sorted(set(g.how.values()))
        lines.append(
            f"| {g.out_features} x {g.in_features} | {', '.join(g.names)} | {g.count} | "
            f"{'; '.join(sources)} | " + " | ".join(f"{g.seconds[m]:.2f}" for m in result.methods) + " |"
        )
    lines.append(
        "| **total** | | **"
        + str(sum(g.count for g in result.groups))
        + "** | | "
        + " | ".join(f"**{_duration(result.totals[m])}**" for m in result.methods)
        + " |"
    )
    mask_total = result.totals["mask"]
    default_refit = sorted(set(result.default_refit.values()))
    lines += [
        "",
        f'Defaults (`update="obs"`: OBS + the `auto` refit, here {" / ".join(default_refit)}): '
        f"**{_duration(result.default_total)}** for the whole model, "
        f"{result.default_total / mask_total:.0f}x the mask-only pass ({_duration(mask_total)}); "
        f"the OBS update alone {_duration(result.totals['obs'])} "
        f"({result.totals['obs'] / mask_total:.0f}x). Calibration passes (the sampler runs that record "
        "the Grams) are not included.",
        "",
    ]
    return "\n".join(lines)


def report_filename(*, quick: bool, device: torch.device | str) -> str:
    dev = torch.device(device)
    return "obs_speed" + ("_quick" if quick else "") + ("" if dev.type == "cpu" else f"_{dev.type}") + ".md"


def write_obs_speed(
    out_dir: Path, *, command: str, quick: bool = False, device: str = "cpu", threads: int | None = None
) -> Path:
    """Run the benchmark (``quick``: widths / 4, 1024 tokens) and write its report under ``out_dir``."""
    result = run_obs_speed(
        width_divisor=4 if quick else 1, tokens=1024 if quick else 4096, device=device, threads=threads
    )
    text = format_obs_speed(result, command)
    return write_report(out_dir, report_filename(quick=quick, device=device), text)
