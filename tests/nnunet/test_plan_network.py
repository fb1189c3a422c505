"""The plan is the network: an edited plan trains an edited network and batch, a checkpoint alone rebuilds its
network, model flags that contradict a checkpoint are errors; the residual-encoder presets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import main
import preprocess
from data_loading.data_module import DataModule
from data_preprocessing.plans import read_config
from data_preprocessing.resenc import BUDGETS, plan_resenc
from nnunet.checkpoints import model_from_checkpoint
from nnunet.network import build_network, parameter_count
from nnunet.nn_unet import NNUnet, model_settings
from tests.factories import blob_case, write_msd_task
from utils.settings import LoaderSettings, NetworkPlan


def convolutions(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv3d)]


@pytest.fixture
def edited_task(synthetic_task, tmp_path) -> tuple[Path, NetworkPlan]:
    """A copy of the synthetic 3D task whose plan names another network and batch size."""
    data = tmp_path / "00_3d"
    shutil.copytree(synthetic_task.preprocessed(3), data)
    config = json.loads((data / "config.json").read_text())
    network = NetworkPlan.from_dict(config["network"])
    n = network.n_stages
    edited = network.replace(features=tuple(6 + 2 * s for s in range(n)), encoder_blocks=(1,) + (3,) * (n - 1),
                             decoder_blocks=(1,) * (n - 1), kernels=((1, 3, 3), *network.kernels[1:]))
    config.update(network=edited.to_dict(), batch_size=3)
    (data / "config.json").write_text(json.dumps(config))
    return data, edited


def test_an_edited_plan_changes_the_network_and_the_batch(edited_task):
    data, edited = edited_task
    config = read_config(data)
    module = NNUnet(config, model_settings(config))
    assert module.settings.network == edited
    encoder = [convolutions(stage) for stage in module.model.encoder]
    assert [len(stage) for stage in encoder] == list(edited.encoder_blocks)
    assert [stage[0].out_channels for stage in encoder] == list(edited.features)
    assert list(encoder[0][0].kernel_size) == [1, 3, 3]
    assert all(len(convolutions(stage)) == 1 for stage in module.model.decoder)
    loader = DataModule(LoaderSettings(data=str(data), num_workers=1, nfolds=4, seed=0))
    loader.setup("fit")
    assert loader.batch_size == 3 and next(iter(loader.train_dataloader()))["image"].shape[0] == 3
    loader.teardown()
    # A flag overrides the plan for one run.
    override = loader.settings.replace(batch_size=2)
    assert DataModule(override).batch_size == 2


def test_a_checkpoint_alone_rebuilds_its_network_and_refuses_contradicting_flags(edited_task, tmp_path, capsys):
    data, edited = edited_task
    results = tmp_path / "results"
    assert main.main(["--exec_mode", "train", "--data", str(data), "--results", str(results), "--nfolds", "4",
                      "--num_workers", "2", "--seed", "0", "--epochs", "1", "--train_batches", "1",
                      "--save_ckpt"]) == 0
    assert "batch 3" in capsys.readouterr().out  # the plan's batch size
    checkpoint = results / "checkpoints" / "last.ckpt"
    model = model_from_checkpoint(checkpoint)
    assert model.settings.network == edited
    predict = ["--exec_mode", "predict", "--data", str(data), "--results", str(tmp_path / "p"),
               "--ckpt_path", str(checkpoint), "--num_workers", "2"]
    evaluate = ["--exec_mode", "evaluate", "--data", str(data), "--results", str(tmp_path / "e"), "--nfolds", "4",
                "--ckpt_path", str(checkpoint), "--num_workers", "2"]
    assert main.main([*evaluate, "--norm", "instance", "--res_block"]) == 1  # a plain network: --res_block differs
    assert "--res_block contradicts checkpoint" in capsys.readouterr().err
    for flags, message in ((["--norm", "batch"], "--norm batch contradicts checkpoint"),
                           (["--filters", *map(str, range(20, 20 + edited.n_stages))],
                            f"whose network has features {list(edited.features)}"),
                           (["--deep_supervision"], "deep_supervision_heads 0"),
                           (["--brats"], "--brats contradicts checkpoint")):
        for argv in (evaluate, predict):
            assert main.main([*argv, *flags]) == 1
            error = capsys.readouterr().err.strip()
            assert message in error and "\n" not in error, error
    # Flags that agree with the checkpoint are accepted.
    assert main.main([*evaluate, "--norm", "instance", "--filters", *map(str, edited.features)]) == 0


def test_the_checkpoint_records_the_network_the_flags_made(trained):
    network = model_from_checkpoint(trained / "checkpoints" / "last.ckpt").settings.network
    assert network.features == (8, 16, 32, 64)[:network.n_stages]  # train_argv's --filters, cut to the stages
    assert network.kind == "unet" and network.encoder_blocks == (2,) * network.n_stages


def test_a_plan_written_before_the_network_was_part_of_it_still_trains_the_same_network(synthetic_task, tmp_path):
    data = tmp_path / "00_3d"
    shutil.copytree(synthetic_task.preprocessed(3), data, ignore=shutil.ignore_patterns("test", "*_x.npy", "*_y.npy"))
    config = json.loads((data / "config.json").read_text())
    network = config.pop("network")
    del config["planner"]
    config.update(kernels=network["kernels"], strides=network["strides"])
    (data / "config.json").write_text(json.dumps(config))
    assert read_config(data)["network"] == network


# nnU-Net v2 2.8.1's plans for the same fingerprints (its planners run on fingerprint files, 20 identical cases):
# (patch, batch, stages, parameters with 1 input channel and 3 classes).
REFERENCE = {
    ("isotropic", "resenc_m"): ([128, 128, 128], 2, 6, 102.350575e6),
    ("isotropic", "resenc_l"): ([160, 192, 160], 3, 6, 102.350575e6),
    ("isotropic", "resenc_xl"): ([160, 192, 160], 6, 6, 102.350575e6),
    ("anisotropic", "resenc_m"): ([40, 192, 192], 2, 6, 101.682351e6),
    ("anisotropic", "resenc_l"): ([56, 320, 256], 2, 7, 140.812914e6),
    ("anisotropic", "resenc_xl"): ([64, 384, 320], 2, 7, 141.222514e6),
}
FINGERPRINTS = {"isotropic": ([138, 169, 138], [1.0, 1.0, 1.0]),  # MRI-like: median shape, spacing (D, H, W)
                "anisotropic": ([100, 512, 512], [5.0, 0.78, 0.78])}  # CT-like


@pytest.mark.parametrize("fingerprint, preset", sorted(REFERENCE))
def test_residual_encoder_presets_match_nnunet_v2(fingerprint, preset):
    patch, batch, stages, parameters = REFERENCE[(fingerprint, preset)]
    planned = plan_resenc(*FINGERPRINTS[fingerprint], preset)
    assert planned.patch_size == patch and planned.batch_size == batch
    network = planned.network
    assert network.kind == "resenc_unet" and network.n_stages == stages
    assert network.encoder_blocks == (1, 3, 4, 6, 6, 6, 6)[:stages] and network.decoder_blocks == (1,) * (stages - 1)
    assert planned.estimate <= BUDGETS[preset][0]  # the memory budget is respected
    with torch.device("meta"):
        counted = parameter_count(build_network(1, 3, network))
    assert abs(counted - parameters) / parameters < 0.01


def test_preprocess_writes_the_residual_preset_and_training_builds_it(tmp_path, capsys):
    cases = [blob_case(f"case_{i}", shape=(24, 24, 16), seed=i) for i in range(3)]
    task = write_msd_task(tmp_path / "raw", "Task61_Res", cases)
    argv = ["--task", "61", "--data", str(task.root.parent), "--results", str(tmp_path / "out"), "--n_jobs", "1"]
    assert preprocess.main([*argv, "--planner", "resenc_m"]) == 0
    config = read_config(tmp_path / "out" / "61_3d")
    assert config["planner"] == "resenc_m" and config["network"]["kind"] == "resenc_unet"
    assert config["network"]["encoder_blocks"][:3] == [1, 3, 4]
    module = NNUnet(config, model_settings(config))
    assert any(hasattr(m, "conv3") for m in module.model.modules())  # residual blocks
    # Another preset plans again; without --planner the existing plan's preset stays.
    assert preprocess.main(argv) == 0
    assert read_config(tmp_path / "out" / "61_3d")["planner"] == "resenc_m"
    assert preprocess.main([*argv, "--planner", "default"]) == 0
    assert read_config(tmp_path / "out" / "61_3d")["network"]["kind"] == "unet"
