"""Prompt sets: many calibration prompts with a fixed held-out part, what a calibration records of
them, and the held-out check's figures.

A prompt set is text, one prompt per line: blank lines and lines starting with ``#`` are skipped,
and a line ``[held-out]`` starts the held-out part (prompts that are never calibrated on). Without
that line, :func:`parse_prompts` can hold out a fixed fraction, spread evenly over the list. The
default set (:data:`DEFAULT_PROMPT_FILE`, written for this project) has 103 calibration and 16
held-out prompts.

A calibration records what it saw (:func:`calibration_record`): its prompts (texts, a hash and the
count), seeds, sizes, steps and timestep weighting; :func:`merge_records` merges two records as
:meth:`~ditprune_core.stats.CalibrationStats.merge` merges the statistics.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_MAX_PROMPTS",
    "DEFAULT_PROMPT_FILE",
    "HELD_OUT_MARKER",
    "HeldOutCheck",
    "PromptScore",
    "PromptSet",
    "PromptSetError",
    "calibration_record",
    "calibration_runs",
    "merge_records",
    "parse_prompts",
    "parse_sizes",
    "prompts_hash",
    "read_prompt_file",
    "record_of",
    "record_text",
    "sample_scores",
    "split_held_out",
]

DEFAULT_PROMPT_FILE = Path(__file__).resolve().parent / "assets" / "prompts.txt"
HELD_OUT_MARKER = "[held-out]"
DEFAULT_MAX_PROMPTS = 256
#: prompt files larger than this are refused (a prompt list is a few kB; a bigger file is not one)
MAX_PROMPT_FILE_BYTES = 4 << 20


class PromptSetError(ValueError):
    """A prompt set that cannot be used: empty, too long, unreadable, or no held-out part."""


@dataclass(frozen=True)
class PromptSet:
    """Calibration prompts and held-out prompts (never calibrated on), and where they came from."""

    calibration: tuple[str, ...]
    held_out: tuple[str, ...] = ()
    source: str = "text"

    def __post_init__(self) -> None:
        if not self.calibration:
            raise PromptSetError(
                f"{self.source}: the prompt set has no calibration prompt; write one prompt per line"
                + (f" above the {HELD_OUT_MARKER} line" if self.held_out else "")
            )

    @property
    def hash(self) -> str:
        """:func:`prompts_hash` of the calibration prompts."""
        return prompts_hash(self.calibration)

    def record(self) -> dict[str, Any]:
        """What a calibration file records of the set: source, counts, hash, the prompts."""
        return {
            "source": self.source,
            "count": len(self.calibration),
            "held_out": len(self.held_out),
            "hash": self.hash,
        }


def prompts_hash(prompts: Iterable[str]) -> str:
    """A 16-hex-digit SHA-256 of the prompts in order (equal lists, equal hash)."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


def split_held_out(prompts: Sequence[str], fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(calibration, held_out)``: ``round(len(prompts) * fraction)`` prompts held out, spread evenly
    over the list (prompt ``i`` is held out when ``floor((i + 1) * f) > floor(i * f)``), so a list
    grouped by topic keeps every topic on both sides. The same list gives the same split.

    Raises:
        PromptSetError: ``fraction`` outside [0, 1), or it would leave no calibration prompt.
    """
    if not 0.0 <= fraction < 1.0:
        raise PromptSetError(f"held-out fraction must be in [0, 1), got {fraction}")
    count = round(len(prompts) * fraction)
    if count == 0:
        return tuple(prompts), ()
    step = count / len(prompts)
    held = {i for i in range(len(prompts)) if math.floor((i + 1) * step + 1e-9) > math.floor(i * step + 1e-9)}
    calibration = tuple(p for i, p in enumerate(prompts) if i not in held)
    if not calibration:
        raise PromptSetError(f"a held-out fraction of {fraction} leaves no calibration prompt; lower it")
    return calibration, tuple(p for i, p in enumerate(prompts) if i in held)


def parse_prompts(
    text: str,
    *,
    source: str = "text",
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    held_out_fraction: float = 0.0,
) -> PromptSet:
    """A :class:`PromptSet` from one-prompt-a-line text.

    A ``[held-out]`` line splits the text itself (``held_out_fraction`` is then ignored); without it
    :func:`split_held_out` holds out ``held_out_fraction`` of the prompts.

    Args:
        text: the prompts.
        source: where they came from, for messages and the record (a file name, ``"text"``).
        max_prompts: the most calibration + held-out prompts accepted.
        held_out_fraction: used when the text has no ``[held-out]`` line.
    Raises:
        PromptSetError: no prompt (empty, only blank or comment lines), more than ``max_prompts``
            (saying how to raise it), or two ``[held-out]`` lines.
    """
    parts: list[list[str]] = [[]]
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.lower() == HELD_OUT_MARKER:
            if len(parts) > 1:
                raise PromptSetError(f"{source}: more than one {HELD_OUT_MARKER} line; keep one")
            parts.append([])
            continue
        parts[-1].append(stripped)
    total = sum(len(p) for p in parts)
    if total == 0:
        raise PromptSetError(
            f"{source}: no prompt in it (empty, or only blank and # comment lines); write one prompt per line"
        )
    if total > max_prompts:
        raise PromptSetError(
            f"{source}: {total} prompts, more than max_prompts = {max_prompts}. Raise max_prompts on the "
            f"Prompt Set node to at least {total} (each prompt is sampled in every calibration pass), "
            "or shorten the list"
        )
    if len(parts) > 1:
        return PromptSet(tuple(parts[0]), tuple(parts[1]), source)
    calibration, held_out = split_held_out(parts[0], held_out_fraction)
    return PromptSet(calibration, held_out, source)


def read_prompt_file(path: str | Path, **options: Any) -> PromptSet:
    """:func:`parse_prompts` of a UTF-8 text file (``options`` as there; ``source`` is the file name).

    Raises:
        PromptSetError: the file is missing, a folder, too large, or not UTF-8 text.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(
            f"prompt file {path} does not exist; put a .txt file with one prompt per line in ComfyUI's "
            "input folder and pick it"
        )
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise PromptSetError(
            f"prompt file {path} is {size:,} bytes, not a prompt list (at most "
            f"{MAX_PROMPT_FILE_BYTES:,}); pick a .txt file with one prompt per line"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptSetError(
            f"prompt file {path} is not UTF-8 text (byte {exc.start}); save it as plain UTF-8 text, "
            "one prompt per line"
        ) from exc
    if "\x00" in text:
        raise PromptSetError(f"prompt file {path} is binary, not text; pick a .txt file, one prompt per line")
    return parse_prompts(text, **{"source": path.name, **options})


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"1024x1024, 768x1344"`` as ``((1024, 1024), (768, 1344))`` (width x height in pixels); an
    empty text is no size (the caller's LATENT then sets it).

    Raises:
        ValueError: an entry that is not WIDTHxHEIGHT with both sides positive multiples of 16.
    """
    sizes = []
    for item in re.split(r"[,;\s]+", text.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)[xX*](\d+)", item)
        if match is None:
            raise ValueError(f"size {item!r} is not WIDTHxHEIGHT (e.g. 1024x1024); separate sizes by commas")
        width, height = int(match[1]), int(match[2])
        if width <= 0 or height <= 0 or width % 16 or height % 16:
            raise ValueError(f"size {item!r}: width and height must be positive multiples of 16")
        sizes.append((width, height))
    return tuple(dict.fromkeys(sizes))


def calibration_runs(prompts: int, seeds: int, sizes: int) -> int:
    """Sampler runs one calibration pass makes: prompts x seeds x sizes."""
    return prompts * seeds * sizes


def calibration_record(
    *,
    prompts: Sequence[str],
    seeds: Iterable[int],
    sizes: Iterable[str],
    steps: int,
    weighting: str,
    source: str = "text",
) -> dict[str, Any]:
    """What a calibration saw, JSON-able: ``prompts`` (their texts, or for a conditioning given
    without text, ``"conditioning <hash>"``), ``prompt_count``, ``prompt_hash``, ``seeds``, ``sizes``
    (``"WxH"``), ``steps`` and ``weighting`` (lists, so that merged records list every value)."""
    texts = list(dict.fromkeys(prompts))
    return {
        "prompt_sources": [source],
        "prompts": texts,
        "prompt_count": len(texts),
        "prompt_hash": prompts_hash(texts),
        "seeds": sorted(set(int(s) for s in seeds)),
        "sizes": sorted(set(sizes)),
        "steps": [int(steps)],
        "weighting": [str(weighting)],
    }


def merge_records(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The record of two calibrations merged: every prompt, seed, size, step count and weighting of
    either (prompts in order, without repeats; the hash and count of the union)."""
    texts = list(dict.fromkeys([*a.get("prompts", []), *b.get("prompts", [])]))
    return {
        "prompt_sources": list(dict.fromkeys([*a.get("prompt_sources", []), *b.get("prompt_sources", [])])),
        "prompts": texts,
        "prompt_count": len(texts),
        "prompt_hash": prompts_hash(texts),
        "seeds": sorted(set(a.get("seeds", [])) | set(b.get("seeds", []))),
        "sizes": sorted(set(a.get("sizes", [])) | set(b.get("sizes", []))),
        "steps": sorted(set(a.get("steps", [])) | set(b.get("steps", []))),
        "weighting": sorted(set(a.get("weighting", [])) | set(b.get("weighting", []))),
    }


def record_of(settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record in a calibration's settings, or None for files saved before records existed."""
    record = settings.get("record")
    return dict(record) if isinstance(record, Mapping) else None


def record_text(settings: Mapping[str, Any], *, show: int = 5) -> str:
    """The record in words: counts, hash, seeds, sizes, steps, weighting and the first ``show`` prompts."""
    record = record_of(settings)
    if record is None:
        return "no record of its prompts (saved by an older ditprune, or merged with such a file)"
    prompts = list(record.get("prompts", []))
    sources = ", ".join(record.get("prompt_sources", [])) or "?"
    lines = [
        f"{record.get('prompt_count', len(prompts))} prompt(s) (hash {record.get('prompt_hash', '?')}, "
        f"from {sources}), seeds {_short(record.get('seeds', []))}, "
        f"sizes {', '.join(record.get('sizes', [])) or '?'}, steps {_short(record.get('steps', []))}, "
        f"weighting {', '.join(record.get('weighting', [])) or '?'}",
    ]
    lines += [f"  {p}" for p in prompts[:show]]
    if len(prompts) > show:
        lines.append(f"  ... and {len(prompts) - show} more")
    return "\n".join(lines)


def _short(values: Sequence[Any], show: int = 8) -> str:
    items = [str(v) for v in values]
    return ", ".join(items[:show]) + (f", ... ({len(items)} in all)" if len(items) > show else "")


@dataclass(frozen=True)
class PromptScore:
    """One prompt sampled by the dense and the pruned model from the same noise."""

    prompt: str
    held_out: bool
    relative_error: float
    psnr: float


def sample_scores(
    pruned: torch.Tensor, dense: torch.Tensor, *, data_range: float
) -> list[tuple[float, float]]:
    """``(relative error, PSNR in dB)`` of each sample (dim 0): ``||p - d|| / ||d||`` and
    ``10 log10(data_range² / mean((p - d)²))`` (inf where equal).

    Raises:
        ValueError: the shapes differ, or a value is NaN/inf.
    """
    if pruned.shape != dense.shape:
        raise ValueError(f"pruned output is {tuple(pruned.shape)} but dense is {tuple(dense.shape)}")
    p = pruned.reshape(pruned.shape[0], -1).double()
    d = dense.reshape(dense.shape[0], -1).double()
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(d).all())):
        raise ValueError("a sample holds NaN or inf: the model overflowed (fp16?) or is damaged")
    out = []
    for pi, di in zip(p, d, strict=True):
        rel = float((pi - di).norm() / di.norm().clamp_min(1e-12))
        mse = float((pi - di).pow(2).mean())
        out.append((rel, math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)))
    return out


@dataclass(frozen=True)
class HeldOutCheck:
    """The held-out check's figures: each prompt's score, and the held-out vs seen means.

    ``ratio`` is mean held-out relative error over mean seen relative error: near 1 the result holds
    on prompts it did not see; well above 1 (2 and more) it has fitted its calibration prompts.
    """

    scores: tuple[PromptScore, ...]
    measured_on: str = "images"

    def _mean(self, held_out: bool, attr: str) -> float:
        values = [getattr(s, attr) for s in self.scores if s.held_out == held_out]
        return sum(values) / len(values) if values else math.nan

    @property
    def held_out_error(self) -> float:
        return self._mean(True, "relative_error")

    @property
    def seen_error(self) -> float:
        return self._mean(False, "relative_error")

    @property
    def held_out_psnr(self) -> float:
        return self._mean(True, "psnr")

    @property
    def seen_psnr(self) -> float:
        return self._mean(False, "psnr")

    @property
    def ratio(self) -> float:
        """Held-out over seen mean relative error (NaN without seen prompts; inf when seen is exact)."""
        seen = self.seen_error
        if math.isnan(seen):
            return math.nan
        return self.held_out_error / seen if seen > 0 else math.inf

    def verdict(self) -> str:
        ratio = self.ratio
        if math.isnan(ratio):
            return "no seen prompt to compare with"
        if ratio >= 2.0:
            return (
                "OVERFITTED: held-out prompts are much worse than the calibration prompts; calibrate on "
                "more and more varied prompts"
            )
        if ratio >= 1.3:
            return "held-out prompts are somewhat worse than seen ones; more calibration prompts would help"
        return "holds on unseen prompts (held-out about as good as seen)"

    def to_text(self) -> str:
        held = sum(s.held_out for s in self.scores)
        lines = [
            f"held-out check on {self.measured_on}, dense vs pruned from the same noise: "
            f"held-out ({held} prompts) relative error {self.held_out_error:.4f}, PSNR "
            f"{self.held_out_psnr:.2f} dB; seen ({len(self.scores) - held}) relative error "
            f"{self.seen_error:.4f}, PSNR {self.seen_psnr:.2f} dB; held-out / seen error {self.ratio:.2f}",
            self.verdict(),
        ]
        for s in self.scores:
            lines.append(
                f"  {'held-out' if s.held_out else 'seen    '} rel {s.relative_error:.4f}, "
                f"PSNR {s.psnr:.2f} dB: {s.prompt}"
            )
        return "\n".join(lines)
