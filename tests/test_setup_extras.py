"""setup.py's accelerator extras (`pip install -e .[tpu]`, `.[cuda12]`, `.[cuda13]`) install
jax with jax's own extra inside the same version range as the base install, as the installed
package's metadata says (no download: reinstall with `pip install -e .` after editing
setup.py)."""

import importlib.metadata

import pytest
from packaging.requirements import Requirement

EXTRAS = ("tpu", "cuda12", "cuda13")


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in importlib.metadata.requires("vit_jax") or []]


def _in_extra(requirement: Requirement, extra: str | None) -> bool:
    if requirement.marker is None:
        return extra is None
    return extra is not None and requirement.marker.evaluate({"extra": extra})


def _base_jax() -> Requirement:
    (jax,) = [r for r in _requirements() if r.name == "jax" and _in_extra(r, None)]
    return jax


def test_base_jax_requirement_is_bounded_and_cpu_only():
    jax = _base_jax()
    assert not jax.extras  # the default install is CPU-only jax
    assert any(s.operator == "<" for s in jax.specifier), jax
    assert any(s.operator == ">=" for s in jax.specifier), jax
    assert importlib.metadata.version("jax") in jax.specifier


@pytest.mark.parametrize("extra", EXTRAS)
def test_accelerator_extra_pins_jax_with_its_extra_in_the_base_range(extra):
    provided = importlib.metadata.metadata("vit_jax").get_all("Provides-Extra") or []
    assert extra in provided, (
        f"vit_jax[{extra}] is not in the installed metadata ({provided}); reinstall with "
        "`python3 -m pip install -e .`"
    )
    in_extra = [r for r in _requirements() if _in_extra(r, extra) and r.marker is not None]
    (jax,) = [r for r in in_extra if r.name == "jax"]
    assert jax.extras == {extra}
    assert jax.specifier == _base_jax().specifier
    # The installed jax defines the extra that vit_jax's extra asks for.
    assert extra in (importlib.metadata.metadata("jax").get_all("Provides-Extra") or [])


def test_each_extra_selects_only_its_own_accelerator_build():
    """`.[tpu]` brings no CUDA plugin, `.[test]` no accelerator build at all."""
    for extra in (*EXTRAS, "test"):
        selected = [r for r in _requirements() if r.name == "jax" and _in_extra(r, extra)]
        expected = [] if extra == "test" else [{extra}]
        assert [r.extras for r in selected if r.marker is not None] == expected, extra
