"""The run planner (`python -m vit_jax plan`): tiny models, 8 simulated devices."""

import json
import os
import re
import shlex

import jax
import pytest

from tests.helpers import PLAN_FLAGS, PLAN_SPEC, plan_config
from vit_jax import cli, config_loader
from vit_jax.commands import plan


def vit_params(width, depth, mlp, patch, tokens, classes, cls_token) -> int:
    """A ViT's parameter count from its shape, written out layer by layer."""
    embed = patch * patch * 3 * width + width
    posemb = tokens * width + (width if cls_token else 0)
    block = 2 * 2 * width + 4 * (width * width + width) + 2 * width * mlp + mlp + width
    return embed + posemb + depth * block + 2 * width + width * classes + classes


def test_parameter_formula_matches_reference_ti16():
    # ViT-Ti/16 at 224 px, 1000 classes, class token: the published parameter count.
    assert vit_params(192, 12, 768, 16, 196 + 1, 1000, cls_token=True) == 5_717_416


@pytest.fixture(scope="module")
def fsdp_plan():
    return plan.plan(plan_config("fsdp=8"), 8, device_kind="a100")


def test_plan_fields_are_consistent(fsdp_plan):
    p = fsdp_plan
    params = vit_params(32, 2, 64, 16, 4, 10, cls_token=False)  # gap: no class token
    assert p["params"] == params
    assert p["mesh"] == {"data": 1, "fsdp": 8, "model": 1}
    used = p["bytes_per_device"]
    # f32 parameters split 8 ways (a few small vectors without an `embed` axis stay whole).
    assert params * 4 / 8 <= used["params"] <= 1.15 * params * 4 / 8
    # AdamW: two moments shaped like the parameters, plus step counters.
    assert 0 <= used["optimizer"] - 2 * used["params"] <= 64
    assert used["arguments"] >= used["params"] + used["optimizer"]
    # The batch shard: 2 images of 32x32x3 f32 and 2x10 labels per device.
    assert used["batch_and_other_arguments"] >= 2 * 32 * 32 * 3 * 4 + 2 * 10 * 4
    assert used["temporaries"] > 0 and used["aliased"] > 0  # the state is donated
    flops = p["flops_per_step"]
    # XLA's count of the compiled step against 6 x parameters x tokens (4 per image, 16 images).
    assert 0.5 < flops["xla_unpartitioned"] / (6 * params * 4 * 16) < 2
    assert p["fits"] and p["memory_per_device_bytes"] == 80e9
    assert p["step_time_s"] > 0 and p["images_per_s"] > 0
    assert "proposal" not in p and "CPU" in p["measured"]
    json.dumps(p)  # printable as JSON


@pytest.mark.slow
def test_layout_that_does_not_fit_names_one_that_does(fsdp_plan):
    # A chip just big enough for the FSDP layout: data parallelism (replicated state) is over.
    memory = fsdp_plan["bytes_per_device"]["total"] * 1.01 / 0.9
    p = plan.plan(plan_config("data=8"), 8, memory_bytes=memory)
    assert not p["fits"]
    assert p["bytes_per_device"]["total"] > p["budget_bytes"]
    proposal = p["proposal"]
    assert proposal["fits"], proposal
    assert proposal["bytes_per_device"] <= p["budget_bytes"]
    assert proposal["mesh"]["fsdp"] * proposal["mesh"]["model"] > 1
    assert proposal["flags"].startswith("--mesh ")
    assert proposal["compiled"][-1]["compiled_bytes"] == proposal["bytes_per_device"]


def test_mesh_not_dividing_devices_is_one_line_error(capsys):
    status = cli.run(
        "plan", ["--config", PLAN_SPEC, *PLAN_FLAGS, "--devices", "8", "--mesh", "fsdp=3"]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error: config.mesh") and "needs 3 devices" in err
    assert "\n" not in err


def test_batch_not_dividing_data_parallel_devices_is_one_line_error(capsys):
    argv = ["--config", PLAN_SPEC, *PLAN_FLAGS, "--config.batch_size=12", "--devices", "8"]
    assert cli.run("plan", [*argv, "--mesh", "data=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.batch_size=12" in err and "\n" not in err


def test_cli_in_a_running_jax_plans_on_its_first_devices(capfd):
    # JAX already runs with 8 devices here: the command plans on the first 4 of them.
    assert jax.device_count() == 8
    argv = ["--config", PLAN_SPEC, *PLAN_FLAGS, "--devices", "4", "--mesh", "data=2,fsdp=2"]
    status = cli.run("plan", [*argv, "--device-kind", "tpu-v5e", "--mfu", "0.4"])
    out, err = capfd.readouterr()
    assert status == 0, err[-2000:]
    result = json.loads(out)
    assert result["devices"] == 4 and result["mesh"] == {"data": 2, "fsdp": 2, "model": 1}
    assert result["device_kind"] == "tpu-v5e" and result["mfu"] == 0.4
    assert result["memory_per_device_bytes"] == 16 * 2**30
    assert "4 simulated CPU devices" in result["measured"]


def test_readme_plan_commands_parse_and_their_layouts_are_valid():
    """Every `vit_jax plan` command in README.md: flags, config and mesh check out
    (nothing is compiled here; the table's numbers come from running them)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    commands = re.findall(r"`python3? -m vit_jax plan ([^`]+)`", readme)
    assert len(commands) >= 10
    for command in commands:
        rest, overrides = cli.split_overrides(shlex.split(command))
        args = plan.parser().parse_args(rest)
        config, _ = plan.plan_config(args, overrides)
        shape = plan.check_layout(config, args.devices, args.slices)
        total = shape["data"] * shape["fsdp"] * shape["model"]
        assert total == args.devices * args.slices, command


def test_deep_models_are_scanned_unless_the_command_line_says_otherwise():
    deep = config_loader.load_config("vit:L/16,cifar10,small")
    assert plan._auto_scan(deep, []) and deep.model.scan
    unscanned = config_loader.load_config("vit:L/16,cifar10,small", ["model.scan=false"])
    assert not plan._auto_scan(unscanned, ["model.scan=false"]) and not unscanned.model.scan
    shallow = config_loader.load_config("vit:B/16,cifar10,small")
    assert not plan._auto_scan(shallow, []) and not shallow.model.scan


def test_a_flexivit_is_planned_at_its_smallest_patch_size():
    """The step with the most tokens is the one that must fit: patch sizes (8, 16) at 32 px
    are measured at 8 (16 tokens), the FLOPs are the mean of both sizes' steps."""

    def planned(**model):  # 64 images per device: activations outweigh the parameters
        config = plan_config("data=8", **model)
        config.batch_size = 512
        return plan.plan(config, 8), config

    (plain, _), (flexi, config) = planned(), planned(patch_sizes="8,16")
    assert (plain["tokens"], flexi["tokens"]) == (4, 16)  # gap pooling: no class token
    assert flexi["patch_size"].startswith("8 (FlexiViT") and "patch_size" not in plain
    assert flexi["params"] == plain["params"]  # one set of parameters, shaped for 16
    temporaries = (p["bytes_per_device"]["temporaries"] for p in (plain, flexi))
    assert next(temporaries) < next(temporaries)
    flops_at_8 = plan._experiment(config, 8).step_flops(patch_size=8)
    mean = (flops_at_8 + plain["flops_per_step"]["xla_unpartitioned"]) / 2
    assert flexi["flops_per_step"]["xla_unpartitioned"] == pytest.approx(mean, rel=0.02)


def test_a_distilled_run_is_planned_with_its_teacher_in_the_step(tmp_path):
    """An .npz teacher (ViT-mu/4 at 8 px) on a data mesh: its float32 parameters, whole on
    every device, are exactly the step's extra arguments, and its forward pass adds FLOPs."""
    from flax import nnx

    from vit_jax.checkpoint import save_npz
    from vit_jax.models import create_model

    teacher = create_model("ViT-mu/4", num_classes=10, img_size=8)
    save_npz(teacher, str(tmp_path / "teacher.npz"))
    teacher_bytes = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(teacher, nnx.Param)))
    config = plan_config("data=8")
    with config.unlocked():
        config.distill.update(
            teacher=str(tmp_path / "teacher.npz"),
            teacher_model="ViT-mu/4",
            teacher_img_size=8,
            weight=1.0,
        )
    plain, distilled = plan.plan(plan_config("data=8"), 8), plan.plan(config, 8)
    extra = (p["bytes_per_device"]["arguments"] for p in (plain, distilled))
    assert -next(extra) + next(extra) == teacher_bytes
    assert "ViT-mu/4 at 8 px, a released .npz" in distilled["teacher"]
    flops = (p["flops_per_step"]["xla_unpartitioned"] for p in (plain, distilled))
    assert next(flops) < next(flops)
