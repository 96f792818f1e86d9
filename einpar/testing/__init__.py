"""Property-testing sharded programs: assertions, hypothesis strategies and helpers.

    from hypothesis import given
    from einpar.testing import assert_equivalent, relayouts

    program = "examples/mlp/megatron.ein"

    @given(relayouts(program))
    def test_any_layout_computes_the_same(relayout):
        assert_equivalent(program, layouts=relayout, backends=("numpy",))

- `assert_equivalent` (einpar.testing.equivalence): a program, under its layouts or others,
  computes on each backend what its unsharded reference does; a readable report if not.
- `assert_matches` (einpar.testing.matches): a user's own function, whole-array, per-device
  (with NumPy collectives over named axes, einpar.testing.collectives) or under
  `jax.shard_map` (einpar.testing.jax_specs), computes what a program specifies.
- strategies: `programs()`, `contraction_programs()`, `training_programs()` draw random
  programs (einpar.testing.generate); `meshes()`, `layouts()`; `relayouts(program)` and
  `inputs(program)` draw from a given program (einpar.testing.strategies).
- helpers: `shard`/`assemble` (each device's block of an array, and back) and
  `tolerance(program)` (einpar.testing.blocks).
- a pytest plugin (einpar.testing.pytest_plugin): `pytest --ein examples/`.

docs/testing.md shows each in use. This package imports hypothesis, and nothing of JAX
until a JAX backend is asked for.
"""

import importlib

# Each public name and the module that defines it. The modules are imported when a name is
# first used (PEP 562), so that loading the pytest plugin, which lives in this package,
# imports neither NumPy nor hypothesis for a test run that never asks for einpar.
_HOMES = {
    "blocks": ("as_mesh", "assemble", "shard", "tolerance"),
    "collectives": ("Collectives", "DeviceRunError"),
    "equivalence": ("BACKENDS", "assert_equivalent"),
    "generate": ("ALIAS_NAMES", "AXIS_NAMES", "COLLIDING_AXIS_NAMES", "COLLIDING_TENSOR_NAMES",
                 "DEFAULT_DTYPES", "DIM_NAMES", "FLOAT_DTYPES", "INPUT_BOUND", "MAGNITUDE_LIMIT",
                 "REPEAT_DIM", "STATEMENT_KINDS", "SUMMED_SIZE_LIMIT", "Contraction",
                 "GeneratedProgram", "MeshSpec", "OutputInfo", "StatementInfo", "TensorInfo",
                 "contraction_programs", "layouts", "meshes", "programs"),
    "jax_specs": ("ShardMapSpecs", "jax_mesh", "layout_from_spec", "partition_spec", "shard_map_specs"),
    "matches": ("assert_matches",),
    "relayout": ("apply_relayout", "as_program", "program_text", "relayout_text"),
    "strategies": ("INPUT_KINDS", "LARGE_MAGNITUDE", "inputs", "relayouts", "training_programs"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "FLOAT_DTYPES", "DEFAULT_DTYPES", "STATEMENT_KINDS", "MeshSpec", "TensorInfo", "OutputInfo",
    "Contraction", "StatementInfo", "GeneratedProgram", "meshes", "layouts", "programs", "contraction_programs",
    "assert_matches", "Collectives", "DeviceRunError", "partition_spec", "layout_from_spec", "jax_mesh",
    "shard_map_specs", "ShardMapSpecs",
    # assertions, strategies and helpers on a given program
    "assert_equivalent", "BACKENDS", "relayouts", "inputs", "INPUT_KINDS", "LARGE_MAGNITUDE",
    "training_programs", "shard", "assemble", "as_mesh", "tolerance", "as_program", "program_text",
    "relayout_text", "apply_relayout",
]


def __getattr__(name: str):
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'einpar.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found once, then an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME_OF))
