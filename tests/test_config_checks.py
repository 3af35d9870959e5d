"""Values out of range, malformed regexes and a fine-tuning recipe without weights are
refused before anything compiles: one line naming the field, exit status 2."""

import pytest

from vit_jax import cli

REFUSED = [
    ("model.dropout=1.5", "config.model.dropout=1.5 must be in [0.0, 1.0)"),
    ("model.attention_dropout=-0.1", "config.model.attention_dropout=-0.1 must be in"),
    ("model.drop_path=1.0", "config.model.drop_path=1.0 must be in [0.0, 1.0)"),
    ("schedule.base_lr=-1", "config.schedule.base_lr=-1.0 must be a positive number"),
    ("schedule.base_lr=nan", "config.schedule.base_lr=nan must be a positive number"),
    ("schedule.base_lr=0", "config.schedule.base_lr=0.0 must be a positive number"),
    ("optim.weight_decay=inf", "config.optim.weight_decay=inf must be in"),
    ("schedule.warmup_steps=-5", "config.schedule.warmup_steps=-5 must be in"),
    ("mixup.mixup_alpha=-0.2", "config.mixup.mixup_alpha=-0.2 must be in"),
    ("mixup.switch_prob=1.5", "config.mixup.switch_prob=1.5 must be in [0.0, 1.0]"),
    ("label_smoothing=1", "config.label_smoothing=1.0 must be in [0.0, 1.0)"),
    ("optim.lr_mults=head", "config.optim.lr_mults entries must be (regex, multiplier) pairs"),
    ("optim.lr_mults=(('head/.*', 'ten'),)", "the multiplier of ('head/.*', 'ten') is not a"),
    ("optim.freeze=(", "config.optim.freeze regex '(' is invalid"),
    ("recipe=finetune_short", "config.recipe=finetune_short fine-tunes pre-trained weights"),
]


@pytest.mark.parametrize(("override", "message"), REFUSED)
def test_refused_in_one_line_before_anything_compiles(override, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    status = cli.run("train", ["--config=vit", f"--workdir={workdir}", f"--config.{override}"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert not workdir.exists()  # a refused run leaves nothing behind


def test_values_inside_their_ranges_and_a_finetune_with_weights_pass_the_dry_run(tmp_path):
    argv = [
        "--config=vit:Ti/16,cifar10,finetune_short",
        "--config.init_from.path=/data/ViT-Ti_16.npz",  # not here: a warning in a dry run
        "--config.model.dropout=0.1",
        "--config.mixup.switch_prob=1",
        "--config.optim.lr_mults=(('head/.*', 10.0),)",
        f"--workdir={tmp_path / 'run'}",
        "--dry_run",
    ]
    assert cli.run("train", argv) == 0
