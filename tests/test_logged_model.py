"""A training run's best model as an MLflow 3 logged model, registered from it, loaded as code +
data (models-from-code: no pickled Python object in the store), on a real sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mg_ray import tracking
from mg_ray.model_file import MODEL_FILE, model_spec, save_model_file
from mg_ray.registry import promote_run
from mg_ray.tracking import tags
from mg_ray.tracking.models import (
    MODEL_TYPE,
    log_best_model,
    logged_model_name,
    run_logged_model,
)
from mg_ray.train.config import load_config


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MG_RAY_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", uri
    )  # mlflow.set_tracking_uri of an earlier test sets it too
    client = tracking.client(uri)
    experiment = tracking.get_or_create_experiment(client, "mg-ray")
    return uri, client, experiment


def model_file(folder: Path) -> Path:
    cfg = load_config("small", {"model.modality": "pose"})
    spec = model_spec(cfg.model, cfg.data, 4, 17)
    from mg_ray.model_file import build_from_spec

    model = build_from_spec(spec)
    return save_model_file(
        folder / MODEL_FILE,
        spec=spec,
        model_state=model.state_dict(),
        criterion_state={},
        class_names=["a", "b", "c", "d"],
        data={
            "rgb_size": 64,
            "heatmap_size": 16,
            "rgb_frames": 8,
            "pose_frames": 16,
            "sigma": 0.7,
            "layout": "coco17",
            "test_clips": 1,
        },
        metrics={"val_top1": 0.5, "epoch": 1},
    )


def training_run(client, experiment, folder) -> str:
    run_id, _ = tracking.start_or_resume_run(client, experiment, "k", run_name="train-pose")
    client.log_artifact(run_id, str(model_file(folder)), "best_model")
    for step, value in enumerate((0.25, 0.5, 0.4)):
        client.log_metric(run_id, "val_top1", value, step=step)
    client.log_metric(run_id, "best_val_top1", 0.5)
    client.log_param(run_id, "data.root", str(folder))
    tracking.terminate_run(client, run_id, "FINISHED")
    return run_id


def test_a_logged_model_is_named_after_its_run_as_mlflow_allows():
    assert logged_model_name("quick.fused_1c6f6c54") == "quick-fused_1c6f6c54"
    assert logged_model_name("a/b:c%d'e\"f") == "a-b-c-d-e-f" and logged_model_name(None) == "model"


def test_best_model_is_a_logged_model_the_registry_version_points_at(store, tmp_path):
    import mlflow.pyfunc

    uri, client, experiment = store
    assert (
        client.get_experiment(experiment).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )
    run_id = training_run(client, experiment, tmp_path)
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert "mlflow.source.git.commit" in run.data.tags  # the project is a git checkout here

    model_id = log_best_model(client, run_id, uri)
    assert log_best_model(client, run_id, uri) == model_id  # once per run
    model = client.get_logged_model(model_id)
    assert (
        model.name == logged_model_name(run.info.run_name)  # <study>_<trial id> in a study
        and model.model_type == MODEL_TYPE
        and model.source_run_id == run_id
        and str(model.status).endswith("READY")
    )
    assert run_logged_model(client, run_id).model_id == model_id
    outputs = client.get_run(run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_id, 1)]
    assert {m.key: m.value for m in model.metrics} == {"val_top1": 0.5}  # the best epoch's, linked

    files = {f.path for f in client.list_logged_model_artifacts(model_id)}
    assert "MLmodel" in files and not any(p.endswith((".pkl", ".cloudpickle")) for p in files), (
        files
    )

    out = promote_run(run_id, "tiny", tracking_uri=uri)
    version = client.get_model_version("tiny", out["version"])
    # the sqlite registry keeps the link in the version's source (its model_id field stays empty)
    assert version.source == f"models:/{model_id}" and version.run_id == run_id
    # and the logged model lists it, as `mlflow.register_model` would (the UI shows it registered)
    listed = json.loads(client.get_logged_model(model_id).tags[tags.MODEL_VERSIONS])
    assert listed == [{"name": "tiny", "version": str(out["version"])}]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/tiny@candidate")
    out = loaded.predict(loaded.input_example)  # one clip: its video and skeleton file bytes
    probs = np.stack(out["probabilities"])
    assert probs.shape == (1, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert out["class_name"][0] == ["a", "b", "c", "d"][out["label"][0]]
    assert loaded.unwrap_python_model().class_names == ["a", "b", "c", "d"]
    torch.set_num_threads(2)


def test_dataset_inputs_name_the_folder_fingerprint_and_splits(store, tmp_path):
    from mg_ray.data.config import DataConfig

    _, client, experiment = store
    run_id, _ = tracking.start_or_resume_run(client, experiment, "d")
    (tmp_path / "dataset.json").write_text('{"fingerprint": "' + "ab" * 32 + '"}')
    tracking.log_training_data(
        client, run_id, DataConfig(root=str(tmp_path), rgb_size=64, heatmap_size=16)
    )
    inputs = client.get_run(run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert set(contexts) == {"training", "validation", "test"}
    assert (
        contexts["training"].name == f"{tmp_path.name}:train"
        and contexts["validation"].digest == ("ab" * 32)[:36]
    )
    assert str(tmp_path) in contexts["test"].source


def test_ui_link_opens_the_model_training_view():
    assert (
        tracking.ui_link("http://127.0.0.1:5000/", "3")
        == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    )


class RacedClient:
    """A real client whose first `log_inputs` fails as the loser of the race does: two runs
    logging the same dataset at once (two trials starting together) both try to insert its row,
    and MLflow's sqlite store answers the second with this error (seen with four processes)."""

    RACE = (
        "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
        "datasets.name, datasets.digest"
    )

    def __init__(self, client, error: str = RACE):
        self.client, self.error, self.calls = client, error, 0

    def log_inputs(self, run_id, datasets):
        from mlflow.exceptions import MlflowException

        self.calls += 1
        if self.calls == 1:
            raise MlflowException(self.error)
        return self.client.log_inputs(run_id, datasets=datasets)


def test_a_run_that_loses_the_race_for_a_dataset_row_logs_it_on_a_second_try(store, tmp_path):
    from mlflow.exceptions import MlflowException

    _, client, experiment = store
    run_id, _ = tracking.start_or_resume_run(client, experiment, "raced")
    raced = RacedClient(client)
    tracking.log_dataset(raced, run_id, tmp_path, "ab" * 32, {"training": "train"})
    assert raced.calls == 2 and len(client.get_run(run_id).inputs.dataset_inputs) == 1
    with pytest.raises(MlflowException, match="no such run"):  # other errors are not retried
        tracking.log_dataset(RacedClient(client, "no such run"), run_id, tmp_path, "x", {"a": "b"})
