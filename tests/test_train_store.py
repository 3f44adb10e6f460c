"""`pipeline.training.Store`: the one file store of run and sweep directories (local paths and URIs)."""
import pytest

from pipeline.training import Store


def test_store_reads_writes_lists_and_publishes(tmp_path):
    run = Store(str(tmp_path), "run1")
    assert run.uri == f"{tmp_path}/run1" and run.is_local
    assert run.read_json("atss/mlflow_run.json") is None and not run.exists("atss/mlflow_run.json")
    assert run.write_json("atss/mlflow_run.json", {"run_id": "x"}) == str(tmp_path / "run1" / "atss" / "mlflow_run.json")
    assert run.read_json("atss/mlflow_run.json") == {"run_id": "x"}
    run.child("checkpoint_000000002").write_text("state.pt", "w")
    assert sorted((e.name, e.is_dir) for e in run.list()) == [("atss", True), ("checkpoint_000000002", True)]
    assert [e.name for e in Store(str(tmp_path)).list()] == ["run1"] and Store(str(tmp_path), "none").list() == []
    run.delete("atss/mlflow_run.json")
    assert not run.exists("atss/mlflow_run.json")

    # a file built locally, then published: in a local store the staging path is the file itself
    sweep = Store(str(tmp_path), "sweep", "ablation")
    sweep.staging("results.md").write_text("| a |")
    assert sweep.publish("results.md") == str(tmp_path / "sweep" / "ablation" / "results.md")
    other = tmp_path / "elsewhere.png"
    other.write_bytes(b"png")
    sweep.publish("ap.png", other)
    assert sweep.read_bytes("ap.png") == b"png" and sweep.local_path("ap.png").is_file()

    # the same directory through a file:// URI
    uri = Store(tmp_path.as_uri(), "sweep", "ablation")
    assert uri.read_text("results.md") == "| a |" and uri.location("results.md").endswith("sweep/ablation/results.md")
    with pytest.raises(ValueError, match="storage path must be absolute or a URI, got 'relative'"):
        Store("relative", "run")
