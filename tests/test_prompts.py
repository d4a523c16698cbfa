"""Prompt sets, their records and the held-out check's figures (ditprune_core.prompts), by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ditprune_core.prompts import (
    DEFAULT_PROMPT_FILE,
    HeldOutCheck,
    PromptScore,
    PromptSetError,
    calibration_record,
    merge_records,
    parse_prompts,
    parse_sizes,
    prompts_hash,
    read_prompt_file,
    record_text,
    sample_scores,
    split_held_out,
)
from ditprune_core.stats import CalibrationStats, ChannelSquareMean, LayerStats


def test_lines_comments_and_the_held_out_marker() -> None:
    text = "# a comment\n a cat \n\n[held-out]\na dog\n  # another\n"
    s = parse_prompts("a bird\n" + text, source="mine.txt")
    assert s.calibration == ("a bird", "a cat")
    assert s.held_out == ("a dog",)
    assert s.source == "mine.txt"


@pytest.mark.parametrize("text", ["", "\n\n   \n", "# only a comment\n\n"])
def test_an_empty_set_is_refused(text: str) -> None:
    with pytest.raises(PromptSetError, match=r"no prompt in it.*one prompt per line"):
        parse_prompts(text, source="box")


def test_only_held_out_prompts_is_refused() -> None:
    with pytest.raises(PromptSetError, match=r"no calibration prompt.*above the \[held-out\] line"):
        parse_prompts("[held-out]\na dog")


def test_two_markers_are_refused() -> None:
    with pytest.raises(PromptSetError, match="more than one"):
        parse_prompts("a\n[held-out]\nb\n[held-out]\nc")


def test_more_prompts_than_the_maximum_says_how_to_raise_it() -> None:
    text = "\n".join(f"prompt {i}" for i in range(5))
    with pytest.raises(
        PromptSetError, match=r"5 prompts, more than max_prompts = 4.*Raise max_prompts.*at least 5"
    ):
        parse_prompts(text, max_prompts=4)
    assert len(parse_prompts(text, max_prompts=5).calibration) == 5


def test_the_fraction_split_is_spread_and_fixed() -> None:
    prompts = [f"p{i}" for i in range(10)]
    calibration, held = split_held_out(prompts, 0.2)
    assert held == ("p4", "p9")  # floor((i+1)*0.2) > floor(i*0.2) at i = 4 and 9
    assert calibration == tuple(p for p in prompts if p not in held)
    assert split_held_out(prompts, 0.2) == (calibration, held)
    assert split_held_out(prompts, 0.0) == (tuple(prompts), ())
    with pytest.raises(PromptSetError, match=r"\[0, 1\)"):
        split_held_out(prompts, 1.0)
    # a marker wins over the fraction
    s = parse_prompts("a\nb\n[held-out]\nc", held_out_fraction=0.5)
    assert (s.calibration, s.held_out) == (("a", "b"), ("c",))


def test_prompt_files(tmp_path: Path) -> None:
    good = tmp_path / "set.txt"
    good.write_text("a cat\nb dog\n", encoding="utf-8")
    assert read_prompt_file(good).calibration == ("a cat", "b dog")
    assert read_prompt_file(good).source == "set.txt"
    with pytest.raises(PromptSetError, match=r"does not exist.*input folder"):
        read_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(PromptSetError, match="does not exist"):
        read_prompt_file(tmp_path)  # a folder
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")
    with pytest.raises(PromptSetError, match="not UTF-8 text"):
        read_prompt_file(binary)
    zeros = tmp_path / "zeros.txt"
    zeros.write_bytes(b"a\x00b\n")
    with pytest.raises(PromptSetError, match="binary, not text"):
        read_prompt_file(zeros)


def test_the_shipped_set() -> None:
    s = read_prompt_file(DEFAULT_PROMPT_FILE)
    assert len(s.calibration) >= 96
    assert 8 <= len(s.held_out) <= 32
    assert not set(s.calibration) & set(s.held_out)
    assert len(set(s.calibration)) == len(s.calibration)
    text = " ".join(s.calibration).lower()
    for topic in (
        "hand",
        "says",
        "portrait",
        "cat",
        "landscape",
        "kitchen",
        "anime",
        "3-d render",
        "painting",
    ):
        assert topic in text or topic in DEFAULT_PROMPT_FILE.read_text().lower(), topic


def test_sizes() -> None:
    assert parse_sizes("1024x1024, 768X1344;512*512") == ((1024, 1024), (768, 1344), (512, 512))
    assert parse_sizes("  ") == ()
    assert parse_sizes("64x64,64x64") == ((64, 64),)
    with pytest.raises(ValueError, match="not WIDTHxHEIGHT"):
        parse_sizes("1024")
    with pytest.raises(ValueError, match="multiples of 16"):
        parse_sizes("1000x1000")


def test_records_merge() -> None:
    a = calibration_record(prompts=["x", "y"], seeds=[1, 0], sizes=["64x64"], steps=4, weighting="log")
    b = calibration_record(
        prompts=["y", "z"], seeds=[2], sizes=["32x32"], steps=2, weighting="log", source="f.txt"
    )
    assert a["prompt_count"] == 2 and a["seeds"] == [0, 1] and a["prompt_hash"] == prompts_hash(["x", "y"])
    m = merge_records(a, b)
    assert m["prompts"] == ["x", "y", "z"]
    assert m["prompt_count"] == 3 and m["prompt_hash"] == prompts_hash(["x", "y", "z"])
    assert m["seeds"] == [0, 1, 2] and m["sizes"] == ["32x32", "64x64"]
    assert m["steps"] == [2, 4] and m["weighting"] == ["log"] and m["prompt_sources"] == ["text", "f.txt"]
    text = record_text({"record": m})
    assert "3 prompt(s)" in text and "seeds 0, 1, 2" in text and "  z" in text
    assert "no record" in record_text({})


def _stats(record: dict | None) -> CalibrationStats:
    acc = ChannelSquareMean(2)
    acc.add_batch(torch.ones(3, 2))
    settings = {"weighting": "log"} if record is None else {"weighting": "log", "record": record}
    return CalibrationStats({"l": LayerStats.from_accumulator(acc, 2, "s")}, "flux", settings)


def test_merging_statistics_merges_their_records(tmp_path: Path) -> None:
    a = calibration_record(prompts=["x"], seeds=[0], sizes=["64x64"], steps=4, weighting="log")
    b = calibration_record(prompts=["y"], seeds=[1], sizes=["64x64"], steps=4, weighting="log")
    merged = _stats(a).merge(_stats(b))
    assert merged.settings["record"] == merge_records(a, b)
    loaded = CalibrationStats.load(merged.save(tmp_path / "m.safetensors"))
    assert loaded.settings["record"] == merge_records(a, b)
    assert "record" not in _stats(a).merge(_stats(None)).settings  # an old file: no made-up record


def test_scores_by_hand() -> None:
    dense = torch.tensor([[1.0, 2.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    pruned = torch.tensor([[1.0, 2.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    (rel0, psnr0), (rel1, psnr1) = sample_scores(pruned, dense, data_range=1.0)
    assert rel0 == pytest.approx(1.0 / 3.0)  # ||(0,0,1,0)|| / ||(1,2,2,0)||
    assert psnr0 == pytest.approx(10 * math.log10(1.0 / 0.25))  # mse 1/4
    assert rel1 == 0.0 and psnr1 == math.inf
    with pytest.raises(ValueError, match="NaN"):
        sample_scores(torch.full((1, 2), math.nan), torch.ones(1, 2), data_range=1.0)
    with pytest.raises(ValueError, match="pruned output is"):
        sample_scores(torch.ones(1, 2), torch.ones(1, 3), data_range=1.0)


def test_held_out_check_text_and_verdict() -> None:
    check = HeldOutCheck(
        (
            PromptScore("seen a", False, 0.1, 30.0),
            PromptScore("seen b", False, 0.3, 20.0),
            PromptScore("new c", True, 0.5, 15.0),
        )
    )
    assert check.seen_error == pytest.approx(0.2) and check.held_out_error == pytest.approx(0.5)
    assert check.ratio == pytest.approx(2.5) and check.seen_psnr == pytest.approx(25.0)
    text = check.to_text()
    assert "OVERFITTED" in text and "held-out / seen error 2.50" in text and "new c" in text
    fine = HeldOutCheck((PromptScore("a", False, 0.1, 30.0), PromptScore("b", True, 0.11, 29.0)))
    assert "holds on unseen prompts" in fine.to_text()


def test_held_out_check_without_seen_prompts_has_no_ratio() -> None:
    alone = HeldOutCheck((PromptScore("b", True, 0.2, 20.0),))
    assert math.isnan(alone.ratio)
    assert "no seen prompt to compare with" in alone.to_text()
