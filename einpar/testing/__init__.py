"""Property-testing sharded programs: hypothesis strategies and assertions.

    from hypothesis import given
    import einpar.api as ein
    from einpar.testing import programs

    @given(programs())
    def test_my_backend_agrees(generated):
        program = ein.compile_source(generated.text)
        expected = ein.run_reference(program, seed=0)
        ...

`programs()` (einpar.testing.generate) draws random, well-formed program text
with what a test needs to know about it. `assert_matches` (einpar.testing.matches)
checks a user's own function, whole-array, per-device or shard_map, against a
program. This package imports hypothesis, and
nothing of JAX until a JAX backend is asked for.
"""

from .generate import (ALIAS_NAMES, AXIS_NAMES, COLLIDING_AXIS_NAMES, COLLIDING_TENSOR_NAMES,  # noqa: F401
                       DEFAULT_DTYPES, DIM_NAMES, FLOAT_DTYPES, INPUT_BOUND, MAGNITUDE_LIMIT, REPEAT_DIM,
                       STATEMENT_KINDS, SUMMED_SIZE_LIMIT, Contraction, GeneratedProgram, MeshSpec,
                       OutputInfo, StatementInfo, TensorInfo, contraction_programs, layouts, meshes,
                       programs)
from .collectives import Collectives, DeviceRunError  # noqa: F401
from .jax_specs import ShardMapSpecs, jax_mesh, layout_from_spec, partition_spec, shard_map_specs  # noqa: F401
from .matches import assert_matches  # noqa: F401

__all__ = [
    "FLOAT_DTYPES", "DEFAULT_DTYPES", "STATEMENT_KINDS", "MeshSpec", "TensorInfo", "OutputInfo",
    "Contraction", "StatementInfo", "GeneratedProgram", "meshes", "layouts", "programs", "contraction_programs",
    "assert_matches", "Collectives", "DeviceRunError", "partition_spec", "layout_from_spec", "jax_mesh",
    "shard_map_specs", "ShardMapSpecs",
]
