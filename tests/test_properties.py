"""Property-based checks (hypothesis) of small pure pieces that everything else relies on."""

import math

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vit_jax import sharding
from vit_jax.checkpoint import resize_posemb
from vit_jax.data.pp_parse import PPError, parse_pp

grids = st.tuples(st.integers(1, 7), st.integers(1, 7))


@settings(max_examples=40, deadline=None)
@given(old=grids, new=grids, method=st.sampled_from(["bilinear", "bicubic"]))
def test_posemb_resize_keeps_class_slot_and_constants(old, new, method):
    rng = np.random.default_rng(old[0] * 10 + new[1])
    cls = rng.standard_normal((1, 1, 4)).astype(np.float32)
    constant = np.full((1, old[0] * old[1], 4), 0.5, np.float32)
    out = resize_posemb(np.concatenate([cls, constant], 1), new, old_grid=old, method=method)
    assert out.shape == (1, 1 + new[0] * new[1], 4)
    np.testing.assert_array_equal(out[:, :1], cls)
    np.testing.assert_allclose(out[:, 1:], 0.5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    dims=st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 10, 12, 16]), min_size=1, max_size=4),
    names=st.lists(
        st.sampled_from(["batch", "embed", "mlp", "heads", "classes", None]),
        min_size=4,
        max_size=4,
    ),
    mesh_shape=st.sampled_from([(8, 1, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)]),
    rules=st.sampled_from(sorted(sharding.RULE_PRESETS)),
)
def test_parameter_specs_always_divide_and_never_reuse_an_axis(dims, names, mesh_shape, rules):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape, strict=True)))
    logical = tuple(names[: len(dims)])
    spec = sharding.logical_to_spec(logical, tuple(dims), mesh, sharding.get_rules(rules))
    used = []
    for size, entry in zip(dims, spec, strict=True):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        assert size % math.prod(mesh.shape[a] for a in axes) == 0
        used.extend(axes)
    assert len(used) == len(set(used))
    jax.sharding.NamedSharding(mesh, spec)  # a valid sharding for this mesh


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_pp_string_parses_or_fails_with_a_pp_error(text):
    try:
        calls = parse_pp(text)
    except PPError:
        return
    assert all(isinstance(call.name, str) for call in calls)
