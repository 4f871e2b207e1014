"""median_ms's schedule on the CPU, on a fake clock (no real timing): rounds of turns, one
function at a time behind its warm-up, the smallest of each function's medians."""

from __future__ import annotations

import types

import pytest

from deformable.benchmarks import timing


def test_cpu_timing_takes_rounds_of_turns_and_keeps_the_smallest_median(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(timing, "CPU_ROUNDS", 3)
    calls = []

    def run(name, seconds):
        costs = iter(seconds)

        def fn():
            calls.append(name)
            clock[0] += next(costs)

        return fn

    # per round: a warm-up, then two timed runs (the warm-up's cost never counts)
    fns = {"a": run("a", [9, 0.005, 0.007, 9, 0.002, 0.004, 9, 0.009, 0.009]),
           "b": run("b", [9, 0.001, 0.001, 9, 0.008, 0.006, 9, 0.003, 0.005])}  # fmt: skip
    result = timing.median_ms(fns, 2)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert result["a"] == pytest.approx(3.0)  # medians 6, 3 and 9 ms
    assert result["b"] == pytest.approx(1.0)  # medians 1, 7 and 4 ms


def test_cpu_name_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU @ 2.0GHz\n\n")
    assert timing.cpu_name(str(cpuinfo)) == "Some CPU @ 2.0GHz"
    assert timing.cpu_name(str(tmp_path / "missing"))  # falls back to the platform's name
