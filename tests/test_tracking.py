"""MLflow run lifecycle against a real sqlite store: one run per key, resumed not duplicated."""

from mg_ray import tracking


def test_run_found_again_by_key_and_terminated(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = tracking.get_or_create_experiment(client, "t")
    run_id, resumed = tracking.start_or_resume_run(client, exp, "study/trial-1", params={"a": 1})
    assert not resumed
    tracking.terminate_run(client, run_id, "KILLED")
    again, resumed = tracking.start_or_resume_run(client, exp, "study/trial-1", params={"a": 1})
    assert resumed and again == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    tracking.terminate_run(client, run_id, "FINISHED")
    runs = client.search_runs([exp])
    assert (
        len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params == {"a": "1"}
    )


def test_unreachable_tracking_server_is_a_clear_error():
    import pytest

    with pytest.raises(ConnectionError, match="cannot be reached"):
        tracking.check_tracking_server("http://127.0.0.1:9", timeout_s=2)
