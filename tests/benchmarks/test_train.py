"""The training-step benchmark: every DigitNet variant in both memory formats, ratios against
the regular CNN of the same format, and a command that refuses bad sizes."""

import json

import pytest

from deformable.benchmarks import train
from deformable.commands import bench_train


def test_train_benchmark_times_every_variant_in_both_formats():
    result = train.run(batch=2, size=16, repeats=1)
    rows = {(row["variant"], row["format"]): row for row in result["rows"]}
    assert set(rows) == {(v, f) for v in train.VARIANTS for f in train.FORMATS}
    for (variant, fmt), row in rows.items():
        assert row["ms"] > 0
        assert row["vs_regular"] == pytest.approx(row["ms"] / rows[("regular", fmt)]["ms"])
    table = train.markdown(result)
    assert "DCNv2 (last 2 layers) | channels-last" in table
    assert table.count("\n") == 1 + len(rows)


def test_a_step_trains_in_channels_last_memory():
    step = train._trainer("dcnv2", train.FORMATS["channels-last"], batch=4, size=16)
    first = step().item()
    for _ in range(5):
        last = step().item()
    assert last < first  # the same batch: the loss must fall


def test_bench_train_writes_json_and_refuses_a_zero_batch(tmp_path, capsys):
    path = tmp_path / "train.json"
    assert bench_train.main(["--batch", "2", "--size", "16", "--repeats", "1",
                             "--json", str(path)]) == 0  # fmt: skip
    assert "regular CNN" in capsys.readouterr().out
    assert len(json.loads(path.read_text())["rows"]) == 6
    with pytest.raises(SystemExit) as info:
        bench_train.main(["--batch", "0"])
    assert info.value.code == 2
    assert "--batch" in capsys.readouterr().err
