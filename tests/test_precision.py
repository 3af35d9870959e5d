"""Precision settings: float16 (no loss scaling here) is refused in one line naming the field,
and parameters stored below float32 (no float32 master copy) need an explicit acknowledgment."""

import pytest

from vit_jax.config_loader import load_config
from vit_jax.errors import UserError
from vit_jax.validate import check_config


def checked(*overrides: str):
    config = load_config("vit", list(overrides))
    check_config(config)
    return config


@pytest.mark.parametrize("field", ["model.dtype", "model.param_dtype", "optim.mu_dtype"])
def test_float16_is_refused_in_one_line_naming_the_field(field):
    with pytest.raises(UserError) as error:
        checked(f"{field}=float16", "low_precision_params_ok=True")
    message = str(error.value)
    assert "\n" not in message
    assert f"config.{field}='float16'" in message and "bfloat16" in message


def test_low_precision_parameters_need_the_acknowledgment():
    with pytest.raises(UserError) as error:
        checked("model.param_dtype=bfloat16")
    message = str(error.value)
    assert "\n" not in message and "config.model.param_dtype='bfloat16'" in message
    assert "float32 master" in message and "config.low_precision_params_ok=True" in message
    config = checked("model.param_dtype=bfloat16", "low_precision_params_ok=True")
    assert config.model.param_dtype == "bfloat16"


def test_bfloat16_compute_and_moments_pass_without_the_acknowledgment():
    config = checked("model.dtype=bfloat16", "optim.mu_dtype=bfloat16")
    assert not config.low_precision_params_ok and config.model.param_dtype == "float32"
