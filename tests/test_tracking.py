"""MLflow run lifecycle against a real sqlite store: one run per key, resumed not duplicated, and
a study's run reopened only with the definition it was started with."""

import pytest

from mg_ray import tracking
from mg_ray.tracking import tags


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


def test_a_run_started_with_another_definition_is_refused_untouched(tmp_path):
    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.get_or_create_experiment(client, "t")
    first, _ = tracking.start_or_resume_run(
        client, exp, "study/s", tags={tags.DEFINITION: "aaa"}, what="study 's'"
    )
    tracking.terminate_run(client, first, "KILLED")
    with pytest.raises(tracking.DefinitionChanged, match=f"study 's' already exists .*{first}"):
        tracking.start_or_resume_run(
            client, exp, "study/s", tags={tags.DEFINITION: "bbb"}, what="study 's'"
        )
    run = client.get_run(first)
    assert run.info.status == "KILLED" and run.data.tags[tags.DEFINITION] == "aaa"
    assert len(client.search_runs([exp])) == 1
    again, resumed = tracking.start_or_resume_run(
        client, exp, "study/s", tags={tags.DEFINITION: "aaa"}
    )
    assert resumed and again == first


def test_a_finished_run_is_found_only_finished_and_with_its_definition(tmp_path):
    """What lets a study that ended FINISHED be reported without starting Ray."""
    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.get_or_create_experiment(client, "t")

    def finished(definition: str = "aaa"):
        return tracking.finished_run(client, exp, "study/s", definition, "study 's'")

    assert finished() is None  # no run yet
    run_id, _ = tracking.start_or_resume_run(client, exp, "study/s", tags={tags.DEFINITION: "aaa"})
    for status in ("RUNNING", "KILLED", "FAILED"):  # open or interrupted: to be resumed
        if status != "RUNNING":
            tracking.terminate_run(client, run_id, status)
        assert finished() is None, status
    tracking.terminate_run(client, run_id, "FINISHED")
    assert finished().info.run_id == run_id
    with pytest.raises(tracking.DefinitionChanged, match=f"study 's' already exists .*{run_id}"):
        finished("bbb")
    assert client.get_run(run_id).info.status == "FINISHED"  # looked at, not reopened


def test_unreachable_tracking_server_is_a_clear_error():
    with pytest.raises(ConnectionError, match="cannot be reached"):
        tracking.check_tracking_server("http://127.0.0.1:9", timeout_s=2)
