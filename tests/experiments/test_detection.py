"""DCNv2's ablation: its table."""

from deformable.engine.detection import COCO_METRICS
from deformable.experiments.detection import ablation_table


def test_ablation_table_cells():
    runs = [{**{f"val_{m}": [0.0, v] for m, v in zip(COCO_METRICS, values)}, "seconds": seconds}
            for values, seconds in (((0.1, 0.2, 0.3, 0.4, 0.5, float("nan")), [10.0, 12.0]),
                                    ((0.2, 0.2, 0.3, 0.4, 0.5, float("nan")), [14.0, 16.0]))]  # fmt: skip
    one = ablation_table({"a": runs[:1]}).splitlines()
    assert one[:2] == ["| setting | AP | AP50 | AP75 | APs | APm | APl | s / epoch |",
                       "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    assert one[2] == "| a | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 | — | 11 |"
    two = ablation_table({"a": runs}).splitlines()[2]
    assert two == "| a | 15.0 ± 7.1 | 20.0 ± 0.0 | 30.0 ± 0.0 | 40.0 ± 0.0 | 50.0 ± 0.0 | — | 13 |"
