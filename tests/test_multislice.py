"""Multi-slice meshes: DCN axes (dcn_data, dcn_fsdp) outside the ICI axes of each slice.

That two local processes of 2 CPU devices each, as 2 slices (devices without a TPU
slice_index are grouped by process), train exactly as one process with 4 devices is the
two-process run of tests/test_launch.py. Here, in-process, the 8 simulated devices are split
into 2 slices of 4 (`make_mesh(..., slices=...)`) to read the compiled step's collectives:
with dcn_fsdp=1 no FSDP all-gather or reduce-scatter crosses a slice, only the gradients'
all-reduce does.
"""

import json
import math

import jax
import pytest

from tests.helpers import PLAN_FLAGS, PLAN_SPEC, plan_config, tiny_config
from vit_jax import cli, sharding
from vit_jax.commands import plan
from vit_jax.errors import UserError
from vit_jax.experiment import Experiment


def two_slices():
    devices = jax.devices()
    return [devices[:4], devices[4:]]


def test_each_mesh_axis_runs_across_slices_outside_and_inside_them():
    slices = two_slices()
    mesh = sharding.make_mesh({"dcn_data": 2, "fsdp": 4, "data": 1}, jax.devices(), slices=slices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    for index, devices in enumerate(slices):  # data's outer (here: whole) part is the slice
        assert set(mesh.devices[index].flat) == set(devices)
    mesh = sharding.make_mesh({"dcn_fsdp": 2, "fsdp": 2, "data": -1}, jax.devices(), slices=slices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    for row in mesh.devices[:, :, 0]:  # fsdp: 2 devices of slice 0, then 2 of slice 1
        assert set(row[:2]) <= set(slices[0]) and set(row[2:]) <= set(slices[1])
    # The batch goes over dcn_data x data x fsdp.
    assert sharding.mesh_shape({"dcn_data": -1, "fsdp": 2, "data": -1}, 8, 2)["data"] == 4


def test_dcn_fields_must_match_the_slices_in_one_line():
    with pytest.raises(UserError, match=r"config.mesh.dcn_data=4 x config.mesh.dcn_fsdp=1 needs"):
        sharding.mesh_shape({"dcn_data": 4, "data": -1}, 8, 2)
    with pytest.raises(UserError, match="at most one DCN field"):
        sharding.mesh_shape({"dcn_data": -1, "dcn_fsdp": -1}, 8, 2)
    with pytest.raises(UserError, match="needs 2 slices but the devices form 1"):
        Experiment.from_config(tiny_config("mesh.dcn_data=2"))  # one process: one slice
    # Per slice: 4 devices, so data=-1 is 2 with fsdp=2; a fixed ICI shape must fill a slice.
    with pytest.raises(UserError, match="needs 8 devices per slice but 4 are available"):
        sharding.mesh_shape({"dcn_data": 2, "data": 8}, 8, 2)
    # DCN fields of product 1 lay one mesh over all devices, however many slices.
    assert sharding.mesh_shape({"data": -1}, 8, 2) == {"data": 8, "fsdp": 1, "model": 1}


def test_dry_run_prints_the_dcn_and_ici_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mesh = ["--config.mesh.dcn_data=2", "--config.mesh.fsdp=2", "--config.mesh.data=-1"]
    assert cli.run("train", [f"--workdir={tmp_path / 'w'}", *mesh, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "run on 8 device(s), mesh data=4 fsdp=2 model=1:" in out
    assert (
        "layout 2 slice(s) (DCN dcn_data=2 dcn_fsdp=1) x 4 device(s) per slice "
        "(ICI data=2 fsdp=2 model=1)" in out
    )


def compiled_step(*mesh):
    experiment = Experiment.from_config(tiny_config(*mesh), slices=two_slices())
    text = experiment.compile_train_step().as_text()
    slice_of = {d.id: i for i, group in enumerate(two_slices()) for d in group}
    assigned = [slice_of[d.id] for d in experiment.mesh.devices.flat]
    return experiment, plan.cross_slice_collectives(text, assigned)


def test_fsdp_collectives_stay_inside_a_slice_and_only_gradients_cross():
    experiment, crossing = compiled_step("mesh.dcn_data=2", "mesh.fsdp=4", "mesh.data=1")
    assert crossing and {kind for kind, _ in crossing} == {"all-reduce"}
    # What crosses is each device's gradient shard: its parameter bytes (XLA sums a few
    # small vectors whole before slicing them, hence up to 10% more).
    params = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(experiment.abstract_state["params"])
    )
    assert params <= sum(size for _, size in crossing) <= 1.1 * params
    # The reader does see FSDP crossing the DCN when the layout asks for it.
    _, crossing = compiled_step("mesh.dcn_fsdp=2", "mesh.fsdp=2", "mesh.data=2")
    assert "all-gather" in {kind for kind, _ in crossing}


def test_device_groups_are_read_from_every_hlo_form():
    assert plan._device_groups("replica_groups={{0,1},{2,3}}, x", 4) == [[0, 1], [2, 3]]
    assert plan._device_groups("replica_groups={}, x", 4) == [[0, 1, 2, 3]]
    assert plan._device_groups("replica_groups=[2,2]<=[2,2]T(1,0), x", 4) == [[0, 2], [1, 3]]
    mesh = "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0))"
    assert plan._device_groups(mesh + " {'axis_2'}, x", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan._device_groups(mesh + " {'axis_0'}, x", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan._device_groups("source_target_pairs={{0,4},{4,0}}, x", 8) == [[0, 4], [4, 0]]


@pytest.fixture(scope="module")
def two_slice_plan():
    return plan.plan(plan_config("fsdp=4,dcn_data=2", depth=1), 4, slices=2, dcn_gbps=50)


def test_plan_of_two_slices_counts_the_gradient_all_reduce_over_the_dcn(two_slice_plan):
    p = two_slice_plan
    assert (p["devices"], p["slices"], p["devices_per_slice"]) == (8, 2, 4)
    assert p["mesh"] == {"data": 2, "fsdp": 4, "model": 1}
    assert p["mesh_dcn"] == {"dcn_data": 2, "dcn_fsdp": 1}
    assert p["mesh_ici"] == {"data": 1, "fsdp": 4, "model": 1}
    assert set(p["cross_slice_collectives"]) == {"all-reduce"}
    dcn, shard = p["dcn"], p["bytes_per_device"]["params"]
    assert dcn["bytes_per_device_per_step"] == dcn["gradient_all_reduce_bytes"] == shard  # n=2
    assert dcn["time_s"] == pytest.approx(shard / (50e9 / 8))
    assert dcn["compute_step_time_s"] == p["step_time_s"]
    assert dcn["hidden"] == (dcn["time_s"] <= 2 / 3 * p["step_time_s"])
    assert p["step_time_s"] == pytest.approx(
        p["flops_per_step"]["xla_unpartitioned"] / (0.5 * p["peak_flops_per_device"] * 8)
    )
    json.dumps(p)


def test_plan_command_puts_the_slices_data_parallel_by_default(capsys):
    argv = [
        "--config",
        PLAN_SPEC,
        *PLAN_FLAGS,
        "--config.model.depth=1",
        "--devices",
        "4",
        "--slices",
        "2",
    ]
    status = cli.run("plan", [*argv, "--mesh", "fsdp=4"])
    out, err = capsys.readouterr()
    assert status == 0, err[-2000:]
    result = json.loads(out)
    assert result["mesh_dcn"] == {"dcn_data": 2, "dcn_fsdp": 1}
    assert result["dcn"]["gbps_per_device"] == plan.DCN_GBPS
    assert cli.run("plan", [*argv, "--mesh", "dcn_data=4"]) == 2
    assert "config.mesh.dcn_data=4 x config.mesh.dcn_fsdp=1 needs 4 slices" in (
        capsys.readouterr().err
    )
