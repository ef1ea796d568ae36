"""The tags mg-ray puts on MLflow runs and registered versions: the whole vocabulary, in one place.

Run tags live in the `mg_ray.` namespace (MLflow's own keep theirs). A run is found again by its
key (`RUN_KEY`), never by its name.
"""

RUN_KEY = "mg_ray.run_key"  # what finds a run again: study/<name>, <study>/<trial id>, ...
# MLflow's nesting: a trial under its study, a stage under its pipeline.
PARENT = "mlflow.parentRunId"

# A run's place in a study or pipeline.
ROLE = "mg_ray.role"  # pipeline, study or trial
PIPELINE, STAGE = "mg_ray.pipeline", "mg_ray.stage"
STAGES = "mg_ray.stages"  # a pipeline's stages, in order
STUDY, TRIAL = "mg_ray.study", "mg_ray.trial_id"
OPTUNA_TRIAL = "mg_ray.optuna_trial"  # the number of the Optuna trial drawn for a trial run
SPACE_FILE = "mg_ray.space_file"
DEFINITION = "mg_ray.space_sha256"  # the fingerprint of a study's space or a pipeline's file

# On a study's run: its best trial's run (named as users look for it), and the markdown MLflow
# shows as the run's description.
BEST_RUN, DESCRIPTION = "best_run_id", "mlflow.note.content"

# How a trial ended (`mg_ray.tune.trial_state`): its state, why it was stopped, the epochs it ran.
STATE, STOP_REASON, EPOCHS = "mg_ray.trial_state", "mg_ray.stop_reason", "mg_ray.trial_epochs"

# Where a training run's Train run and checkpoints live.
TRAIN_RUN, STORAGE_PATH = "mg_ray.train_run", "mg_ray.storage_path"

# An ensemble's run: the runs it combines and their names.
MEMBERS, MEMBER_NAMES = "mg_ray.members", "mg_ray.member_names"

# Lineage: the run a fused model's stream was initialised from (on trial runs and versions).
INIT_RUN = "mg_ray.init.{stream}_run"

# Registered versions (`mg_ray.registry`): what the version was scored on and how it was decided.
VERSION_DATASET, VERSION_DATASET_ROOT, VERSION_VAL_SPLIT = (
    "dataset_fingerprint",
    "dataset_root",
    "val_split",
)
CHAMPION_DECISION = "champion_decision"

# On a logged model: the versions registered from it, as `mlflow.register_model` writes it (a JSON
# list of {"name", "version"}); the UI's logged-model page shows them as registered.
MODEL_VERSIONS = "mlflow.modelVersions"
