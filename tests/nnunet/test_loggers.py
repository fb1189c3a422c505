"""--logger tensorboard csv mlflow: one tiny training, every logger's records read back."""

import csv

import main
from tests.conftest import train_argv


def test_one_epoch_reaches_every_logger(synthetic_task, tmp_path):
    argv = train_argv(synthetic_task.preprocessed(3), tmp_path, "--epochs", "1", "--train_batches", "2",
                      "--logger", "tensorboard", "csv", "mlflow")
    assert main.main(argv) == 0
    assert (tmp_path / "logs.json").is_file()  # the DLLogger log stays
    names = ["dice/edema", "dice/necrosis", "dice/enhancing tumour"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "dice/mean", "learning_rate", *names} <= scalars
    assert [event.step for event in events.Scalars("dice/mean")] == [0]
    assert events.Tags()["images"] == ["overlay"]

    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[-1]["loss/train"]) > 0 and 0 <= float(rows[-1]["dice/mean"]) <= 1

    from mlflow.tracking import MlflowClient

    from nnunet.loggers import mlflow_store

    client = MlflowClient(mlflow_store(tmp_path)[0])
    (run,) = client.search_runs([client.get_experiment_by_name("nnunet").experiment_id])
    assert {*names, "dice/mean", "loss/train"} <= set(run.data.metrics)
    assert run.data.params["epochs"] == "1"
    assert [item.path for item in client.list_artifacts(run.info.run_id, "overlay")] == ["overlay/epoch_0000.png"]
