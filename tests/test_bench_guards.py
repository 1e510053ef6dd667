"""The bench's ratio-guard logic (bench/guards.py) on made-up results: no timing here.

What ``pytest bench/`` decides from its measurements: a ratio below its floor fails naming the guard,
the floor and the value; a device class without floors reports and passes; exact guards need their
exact value; floors.toml is checked entry by entry; the result file has its fixed columns.
"""
from __future__ import annotations

import datetime
import os
import re
import types

import pytest

from bench import guards
from bench.guards import (EXACT, FIELDS, GUARDS, FloorsError, GuardFailure, ResultWriter, check_rows, device_class,
                          enforce, interleave, judge, load_floors, median_ratio, read_results, result_path, summary)

BENCH = os.path.dirname(guards.__file__)
FLOORS = {"cpu": {"train_step_speedup_vs_release": 2.0, "prefix_rollout_speedup": 1.8}}


def fake_rows(device: str, **ratios) -> list[dict]:
    """A result set as a run writes it: per guard, a provider row (absolute time) and the guard row."""
    rows = []
    for name, ratio in ratios.items():
        rows.append(dict(op="op", provider="fastebm", shape="s", metric="median_time_s", value="0.1", ratio="",
                         floor="", device=device, commit="abc"))
        rows.append(dict(op="op", provider="fastebm/ref", shape="s", metric=name, value=str(ratio), ratio=str(ratio),
                         floor="", device=device, commit="abc"))
    return rows


def test_a_ratio_below_its_floor_fails_naming_guard_floor_and_value():
    verdicts = check_rows(fake_rows("cpu", train_step_speedup_vs_release=1.37, prefix_rollout_speedup=2.9), FLOORS)
    assert [v.status for v in verdicts] == ["fail", "pass"]
    with pytest.raises(GuardFailure) as e:
        enforce(verdicts)
    msg = str(e.value)
    assert "train_step_speedup_vs_release" in msg and "1.370x" in msg and "floor 2x" in msg and "[cpu]" in msg
    assert "prefix_rollout_speedup" not in msg  # only the failed guard is named
    assert "train_step_speedup_vs_release" in summary(verdicts) and "fail" in summary(verdicts)


def test_a_device_class_without_floors_reports_and_does_not_fail():
    verdicts = check_rows(fake_rows("cuda-sm90", train_step_speedup_vs_release=0.5), FLOORS)
    (v,) = verdicts
    assert v.status == "no floor" and not v.failed and v.floor is None
    assert "no floor for device class 'cuda-sm90'" in v.message and "0.500x" in v.message
    enforce(verdicts)  # does not raise
    # The same ratio on a device class with a floor fails.
    assert judge("train_step_speedup_vs_release", 0.5, FLOORS, "cpu").failed


def test_floor_boundary_and_missing_entry():
    assert judge("prefix_rollout_speedup", 1.8, FLOORS, "cpu").status == "pass"      # "at least"
    assert judge("prefix_rollout_speedup", 1.7999, FLOORS, "cpu").status == "fail"
    assert judge("prefix_scoring_speedup", 0.1, FLOORS, "cpu").status == "no floor"  # no entry in [cpu]
    assert judge("prefix_rollout_speedup", float("nan"), FLOORS, "cpu").failed       # a broken measurement
    with pytest.raises(KeyError, match="unknown guard 'nope'"):
        judge("nope", 1.0, FLOORS, "cpu")


def test_exact_guards_need_their_value_on_every_device():
    for device in ("cpu", "cuda-sm90", "some-new-device"):
        ok = judge("video_decodes_per_clip_per_step", 1.0, {}, device)
        assert ok.status == "pass" and ok.floor == 1.0
        bad = judge("video_decodes_per_clip_per_step", 2.0, {}, device)
        assert bad.failed and "video_decodes_per_clip_per_step = 2 != 1 (exact)" in bad.message
    assert judge("video_cache_hit_fraction_second_epoch", 0.0, FLOORS, "cpu").failed


def test_rows_that_are_not_guards_are_ignored():
    rows = fake_rows("cpu", prefix_rollout_speedup=3.0)
    assert [v.name for v in check_rows(rows, FLOORS)] == ["prefix_rollout_speedup"]
    assert check_rows(rows, FLOORS, device="cuda-sm80")[0].status == "no floor"  # device override


# ---------------------------------------------------------------------------------- floors --- #

def _write(tmp_path, text: str) -> str:
    p = tmp_path / "floors.toml"
    p.write_text(text)
    return str(p)


def test_the_shipped_floors_cover_every_ratio_guard_on_the_cpu():
    floors = load_floors()
    assert {"cpu", "cuda-sm90", "cuda-sm80"} <= set(floors)
    ratio_guards = set(GUARDS) - set(EXACT)
    assert set(floors["cpu"]) == ratio_guards
    assert all(v > 0 for v in floors["cpu"].values())


def test_every_entry_has_a_comment_saying_where_it_was_measured():
    lines = open(guards.FLOORS_FILE).read().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*\w+\s*=", line):
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"floors.toml line {i + 1} has no comment above"


@pytest.mark.parametrize("text,match", [
    ("[cpu]\nno_such_guard = 1.0\n", r"\[cpu\] no_such_guard: unknown guard"),
    ("[cpu]\nprefix_rollout_speedup = -1\n", r"\[cpu\] prefix_rollout_speedup: a floor must be a finite number > 0"),
    ("[cpu]\nprefix_rollout_speedup = 0\n", r"must be a finite number > 0, got 0"),
    ("[cpu]\nprefix_rollout_speedup = true\n", r"must be a finite number > 0, got True"),
    ("[cpu]\nprefix_rollout_speedup = \"2\"\n", r"must be a finite number > 0, got '2'"),
    ("[cpu]\nprefix_rollout_speedup = nan\n", r"must be a finite number > 0, got nan"),
    ("[cpu]\nvideo_decodes_per_clip_per_step = 1\n", r"an exact guard .* takes no floor"),
    ("cpu = 2.0\n", r"'cpu' must be a table of floors"),
    ("[cpu\n", r"not valid TOML"),
])
def test_bad_floors_name_the_file_and_the_entry(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(FloorsError, match=match) as e:
        load_floors(path)
    assert str(e.value).startswith(path)


def test_missing_floors_file(tmp_path):
    with pytest.raises(FloorsError, match="floors file not found"):
        load_floors(str(tmp_path / "absent.toml"))


def test_integer_floors_are_accepted(tmp_path):
    assert load_floors(_write(tmp_path, "[cpu]\nprefix_rollout_speedup = 2\n[cuda-sm90]\n")) == {
        "cpu": {"prefix_rollout_speedup": 2.0}, "cuda-sm90": {}}


def test_device_class():
    def fake(available, cap=(9, 0)):
        return types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: available,
                                                                get_device_capability=lambda: cap))
    assert device_class(fake(False)) == "cpu"
    assert device_class(fake(True, (9, 0))) == "cuda-sm90"
    assert device_class(fake(True, (8, 0))) == "cuda-sm80"


def test_every_guard_is_run_by_a_bench_file_and_every_run_guard_is_registered():
    used = set()
    for name in os.listdir(BENCH):
        if name.startswith("test_bench_") and name.endswith(".py"):
            text = open(os.path.join(BENCH, name)).read()
            used |= set(re.findall(r'guard\.(?:speedup|check)\(\s*"(\w+)"', text))
    assert used == set(GUARDS)


# ---------------------------------------------------------------------------------- timing --- #

def test_interleave_alternates_and_skips_warmup():
    events, now = [], [0.0]

    def clock():
        return now[0]

    def call(name, cost):
        def run():
            events.append(name)
            now[0] += cost
        return run

    after = []
    times = interleave([call("A", 3.0), call("B", 1.0)], rounds=3, warmup=1, clock=clock, after=after.append)
    assert events == ["A", "B"] * 4            # A, B, A, B, ... (warm-up turn first)
    assert times == [[3.0] * 3, [1.0] * 3]     # the warm-up turn is not counted
    assert after == [0, 1] * 4
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        interleave([call("A", 1.0)], rounds=0)


def test_median_ratio_is_the_median_of_per_round_ratios():
    # The machine slows down in round 2 for both sides: per-round ratios stay 2, 2, 3; the median is 2.
    # (The ratio of the medians would be 4 / 1.5 = 2.67: drift would leak in.)
    ref, fast = [2.0, 8.0, 3.0], [1.0, 4.0, 1.0]
    assert median_ratio(ref, fast) == 2.0
    with pytest.raises(ValueError, match="same number"):
        median_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="> 0"):
        median_ratio([1.0], [0.0])


# --------------------------------------------------------------------------------- results --- #

def test_result_file_has_the_fixed_columns_and_appends(tmp_path):
    path = result_path(str(tmp_path / "results"), "cpu", "abc123",
                       datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc))
    assert os.path.basename(path) == "20260102T030405Z_cpu_abc123.csv"
    w = ResultWriter(path)
    assert not os.path.exists(path)  # nothing measured, no file
    w.write(op="rollout", provider="repeated", shape="P=256", metric="median_time_s", value=0.25, device="cpu",
            commit="abc123")
    w.write(op="rollout", provider="fastebm/repeated", shape="P=256", metric="prefix_rollout_speedup", value=2.5,
            ratio=2.5, floor=1.8, device="cpu", commit="abc123")
    assert open(path).readline().strip() == ",".join(FIELDS)
    rows = read_results(path)
    assert [r["metric"] for r in rows] == ["median_time_s", "prefix_rollout_speedup"]
    assert rows[0]["ratio"] == "" and rows[1]["ratio"] == "2.5" and rows[1]["floor"] == "1.8"
    # A result file read back is a result set the guard logic can judge.
    assert [v.status for v in check_rows(rows, {"cpu": {"prefix_rollout_speedup": 3.0}})] == ["fail"]
    with pytest.raises(ValueError, match="unknown columns \\['quantile'\\]"):
        w.write(op="x", provider="y", metric="z", value=1, quantile=0.5)
    with pytest.raises(ValueError, match="missing \\['value'\\]"):
        w.write(op="x", provider="y", metric="z")


def test_read_results_checks_the_header(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("op,value\nx,1\n")
    with pytest.raises(ValueError, match="columns"):
        read_results(str(p))


def test_main_rechecks_saved_result_files(tmp_path, capsys):
    floors = _write(tmp_path, "[cpu]\nprefix_rollout_speedup = 2.0\n")
    good, bad = str(tmp_path / "good.csv"), str(tmp_path / "bad.csv")
    for path, ratio in ((good, 2.5), (bad, 1.5)):
        ResultWriter(path).write(op="rollout", provider="fastebm/repeated", metric="prefix_rollout_speedup",
                                 value=ratio, ratio=ratio, device="cpu", commit="abc")
    assert guards.main([good, "--floors", floors]) == 0
    assert guards.main([good, bad, "--floors", floors]) == 1
    out = capsys.readouterr().out
    assert "prefix_rollout_speedup" in out and "1.500x  >= 2" in out and "fail" in out
