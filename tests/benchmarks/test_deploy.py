"""The deploy benchmark: PyTorch and onnxruntime run the same DCN ResNet-50 and agree."""

from deformable.benchmarks import deploy


def test_deploy_benchmark_runs_and_agrees(tmp_path):
    row = deploy.run(batch=1, size=32, repeats=1)
    assert row["relative_error"] < 1e-4
    assert row["torch_dcn_ms"] > 0 and row["onnxruntime_dcn_ms"] > 0
    assert "onnxruntime" in deploy.markdown(row)
