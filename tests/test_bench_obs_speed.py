"""The OBS speed benchmark (``python -m bench obsspeed``) on tiny FLUX widths: its table
structure, and that its extrapolation is the sum over FLUX.1-dev's layer counts of the per-layer times."""

from __future__ import annotations

import pytest

from bench.obs_speed import (
    MEASURED_LAYERS,
    ObsSpeedResult,
    flux_prunable_shapes,
    format_obs_speed,
    run_obs_speed,
)


def test_flux_prunable_shapes_count_every_family() -> None:
    shapes = flux_prunable_shapes()
    # 19 double blocks x img/txt x (qkv, proj, mlp.0, mlp.2) + 38 single blocks x (linear1, linear2)
    assert len(shapes) == 19 * 2 * 4 + 38 * 2 == 228
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes.values():
        counts[shape] = counts.get(shape, 0) + 1
    assert counts == {
        (9216, 3072): 38,
        (3072, 3072): 38,
        (12288, 3072): 38,
        (3072, 12288): 38,
        (21504, 3072): 38,
        (3072, 15360): 38,
    }
    assert shapes["single_blocks.37.linear2"] == (3072, 15360)
    assert "double_blocks.0.img_mod.lin" not in shapes  # modulation stays dense by default


@pytest.fixture(scope="module")
def tiny() -> ObsSpeedResult:
    # hidden 48: linear1 336 x 48, linear2 48 x 240, qkv 144 x 48, mlp.2 48 x 192. The flop budget
    # makes the exact refit run whole on qkv (144 x 48³/3 = 5.3e6) and on rows of the others; the
    # zero PCG limit makes every count after the first two an extrapolation
    return run_obs_speed(
        width_divisor=64, tokens=256, pcg_iters=(1, 3), pcg_limit_s=0.0, exact_flop_budget=6e6
    )


def test_measured_layers_ratios_and_memory(tiny: ObsSpeedResult) -> None:
    assert tiny.methods == ["mask", "obs", "pcg-1", "pcg-3", "pcg-5", "exact"]
    assert [(r.name, r.out_features, r.in_features) for r in tiny.layers] == [
        (MEASURED_LAYERS[0], 336, 48),
        (MEASURED_LAYERS[1], 48, 240),
        (MEASURED_LAYERS[2], 144, 48),
        (MEASURED_LAYERS[3], 48, 192),
    ]
    for layer in tiny.layers:
        assert set(layer.methods) == set(tiny.methods)
        for method in tiny.methods:
            assert layer.methods[method].seconds > 0
            assert layer.ratio(method) > 0
        assert layer.ratio("mask") == 1.0
        for k in (1, 3):
            assert layer.methods[f"pcg-{k}"].measured
            assert layer.methods[f"pcg-{k}"].detail.startswith(f"{k} iterations")
        # pcg-5 from the first two counts: setup + 5 x per-iteration
        t1, t3 = layer.methods["pcg-1"].seconds, layer.methods["pcg-3"].seconds
        per = (t3 - t1) / 2
        setup = t3 - 3 * per
        if per <= 0:
            per, setup = t3 / 3, 0.0
        pcg5 = layer.methods["pcg-5"]
        assert not pcg5.measured and pcg5.how.startswith("extrapolated")
        assert pcg5.seconds == pytest.approx(max(0.0, setup) + 5 * per)
        assert pcg5.peak_extra_bytes == layer.methods["pcg-3"].peak_extra_bytes
    exact_how = {r.name: r.methods["exact"].how for r in tiny.layers}
    assert exact_how[MEASURED_LAYERS[2]] == "measured"
    assert exact_how[MEASURED_LAYERS[0]] == "estimated: 162 of 336 rows, x 2.074"
    assert exact_how[MEASURED_LAYERS[1]] == "estimated: 1 of 48 rows, x 48"
    # the OBS update holds at least the dampened Gram and the Cholesky factor of its inverse
    widest = tiny.layers[1]
    assert widest.gram_bytes == 240 * 240 * 4 == tiny.largest_gram_bytes
    obs_peak = widest.methods["obs"].peak_extra_bytes
    # at this tiny width (225 KiB Grams) the process may reuse memory freed by earlier tests, so the
    # resident high-water mark need not move (seen in CI) and no floor can be asserted here (the
    # 2-Gram floor is checked where the Grams dwarf the allocator's free lists: the full command).
    # A ceiling can: the update's temporaries are a few (in, in) and (out, in) float32 tensors, so
    # a peak of 64 Grams plus 64 MiB of allocator slack means memory grows with something else
    assert obs_peak is not None
    assert obs_peak <= 64 * widest.gram_bytes + (64 << 20), obs_peak


def test_extrapolation_is_the_sum_over_layer_counts(tiny: ObsSpeedResult) -> None:
    by_shape = {(r.out_features, r.in_features): r for r in tiny.layers}
    assert sum(g.count for g in tiny.groups) == 228
    assert {(g.out_features, g.in_features): g.count for g in tiny.groups} == {
        (144, 48): 38,
        (48, 48): 38,
        (192, 48): 38,
        (48, 192): 38,
        (336, 48): 38,
        (48, 240): 38,
    }
    qkv, linear1 = by_shape[(144, 48)], by_shape[(336, 48)]
    for method in tiny.methods:
        expected_total = 0.0
        for g in tiny.groups:
            measured = by_shape.get((g.out_features, g.in_features))
            if measured is not None:
                per_layer = measured.methods[method].seconds
            else:  # proj (48 out) and mlp.0 (192 out): the line through qkv and linear1 (48 inputs)
                t_a, t_b = qkv.methods[method].seconds, linear1.methods[method].seconds
                slope = (t_b - t_a) / (336 - 144)
                intercept = t_a - slope * 144
                if slope >= 0 and intercept >= 0:
                    per_layer = intercept + slope * g.out_features
                else:
                    per_layer = g.out_features * (t_a * 144 + t_b * 336) / (144**2 + 336**2)
            assert g.seconds[method] == pytest.approx(per_layer), (g.out_features, g.in_features, method)
            expected_total += g.count * per_layer
        assert tiny.totals[method] == pytest.approx(expected_total)
    # the default update="obs" refits every layer exactly at these widths (in <= 1024)
    assert set(tiny.default_refit.values()) == {"exact"}
    assert tiny.default_total == pytest.approx(tiny.totals["obs"] + tiny.totals["exact"])


def test_report_tables(tiny: ObsSpeedResult) -> None:
    text = format_obs_speed(tiny, "python -m bench obsspeed --test")
    lines = text.splitlines()
    header = "| layer | out x in | mask s | obs | pcg-1 | pcg-3 | pcg-5 | exact |"
    start = lines.index(header)
    rows = lines[start + 2 : start + 6]
    assert [row.split(" | ")[0] for row in rows] == [f"| {name}" for name in MEASURED_LAYERS]
    for row, layer in zip(rows, tiny.layers, strict=True):
        cells = row.strip("|").split(" | ")
        assert len(cells) == 8
        assert float(cells[3].split()[0]) == pytest.approx(layer.ratio("obs"), abs=0.051)
        assert cells[6].endswith("*")  # pcg-5 extrapolated
    assert "| **total** | | **228** |" in text
    assert "extrapolated" in text and "estimated: 1 of 48 rows" in text
