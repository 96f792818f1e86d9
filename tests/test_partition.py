"""The partitioner's choices: the textbook cases (bytes objective, exact collectives and bytes),
the plan's optimality against an exhaustive search, the program set of tests/partition_programs,
pins, and how the search scales with mesh axes."""

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from einpar.api import compile_source, compile_spmd, load, run_reference, run_simulated
from einpar.errors import EinparError
from einpar.lower import compile_program
from einpar.objective import make_objective
from einpar.partition import RepeatDecision, partition
from einpar.spmd import bytes_per_device
from einpar.testing import programs

MATMUL = """\
mesh y=4
dim I={I} J={J} K={K}
input a[{a}]
input b[{b}]
c[{c}] = a[I,J] * b[J,K]
output c[{c}]
"""


def chosen(program):
    """The byte-minimal plan (`--objective bytes`): the textbook cases reason in bytes."""
    return compile_program(program, make_objective(program, "bytes"))[0]


def collectives(partitioned):
    """(kind, tensor, bytes) of every communicating step, in program order."""
    found = []

    def moves_of(steps):
        for step in steps:
            if isinstance(step, RepeatDecision):
                yield from step.entry
                yield from moves_of(step.body)
                yield from step.exit
                continue
            yield from step.moves
            if step.constraint:
                yield step.constraint

    moves = list(moves_of(partitioned.steps)) + [m for _, _, m in partitioned.outputs if m]
    for move in moves:
        layout = move.src
        for step in move.plan.steps:
            nbytes = step.bytes_per_device(layout, partitioned.program.values[move.value].type.shape,
                                           "f32", partitioned.program.mesh)
            layout = step.apply(layout)
            if nbytes:
                found.append((step.kind, move.tensor, nbytes))
    return found


def matmul(a, b, c, I=256, J=512, K=1024):
    return chosen(compile_source(MATMUL.format(I=I, J=J, K=K, a=a, b=b, c=c)))


def test_no_contracting_split_needs_no_communication():
    assert collectives(matmul("I, J", "J, K@y", "I, K@y")) == []


def test_one_contracting_split_gathers_when_the_operand_is_smaller_than_the_result():
    # a is 256x512 split 4 ways: gathering it sends 3 * 256*128*4 bytes, less than
    # all-reducing the 256x1024 result (2 * 3/4 of 1 MiB).
    assert collectives(matmul("I, J@y", "J, K", "I, K")) == [("all_gather", "a", 3 * 256 * 128 * 4)]


def test_one_contracting_split_slices_and_reduces_when_the_result_is_smaller():
    # With K=8 the result is tiny: slice b locally, reduce the partial result.
    chosen = collectives(matmul("I, J@y", "J, K", "I, K", K=8))
    assert chosen == [("all_reduce", "c", 2 * 3 * (256 * 8 // 4) * 4)]


def test_both_split_on_the_contraction_reduce_scatter_when_the_output_is_split():
    assert collectives(matmul("I, J@y", "J@y, K", "I@y, K")) == \
        [("reduce_scatter", "c", 3 * (256 * 1024 // 4) * 4)]


def test_both_split_on_the_contraction_all_reduce_when_the_output_is_whole():
    assert collectives(matmul("I, J@y", "J@y, K", "I, K")) == \
        [("all_reduce", "c", 2 * 3 * (256 * 1024 // 4) * 4)]


def test_both_noncontracting_split_on_one_axis_gathers_the_operand_the_output_does_not_follow():
    # c[I@y, K] keeps a's split; b (small here) is gathered.
    assert collectives(matmul("I@y, J", "J, K@y", "I@y, K", K=64)) == \
        [("all_gather", "b", 3 * 512 * 16 * 4)]


def test_expert_parallel_moe_is_two_all_to_alls():
    kinds = [kind for kind, _, _ in collectives(chosen(load("examples/moe/gshard.ein")))]
    assert kinds == ["all_to_all", "all_to_all"]


def test_megatron_mlp_all_reduces_the_partial_output():
    assert collectives(chosen(load("examples/mlp/megatron.ein"))) == \
        [("all_reduce", "y", 2 * 3 * (4 * 128 * 256 // 4) * 4)]


def kinds_and_tensors(text):
    return [(kind, tensor) for kind, tensor, _ in collectives(chosen(compile_source(text)))]


def test_partial_sums_stay_partial_through_a_sum_and_a_scale():
    # Both contractions are partial over tp; their scaled sum is reduced once, at the end.
    assert kinds_and_tensors("""\
mesh tp=4
dim I=64 J=64 K=64
input a[I, J@tp]
input b[J@tp, K]
input c[I, J@tp]
input d[J@tp, K]
y[I, K] = 0.5 * (sum[J](a[I,J] * b[J,K]) + sum[J](c[I,J] * d[J,K]))
output y[I@tp, K]
""") == [("reduce_scatter", "y")]


def test_softmax_over_a_split_index_finishes_partial_maxima_and_sums():
    # Scores split over T: the row maximum and the row sum are partial over sp.
    partitioned = chosen(compile_source("""\
mesh sp=4
dim S=8 T=64
input s[S, T@sp]
p[S, T@sp] = softmax[T](s[S,T])
output p
"""))
    assert [(kind, tensor) for kind, tensor, _ in collectives(partitioned)] == \
        [("all_reduce", "p"), ("all_reduce", "p")]
    partial = [step.result_layout.partial for step in partitioned.steps if step.result_layout.partial]
    assert partial == [(("sp", "max"),), (("sp", "sum"),)]


def test_a_value_moved_once_is_reused():
    found = kinds_and_tensors("""\
mesh sp=4
dim S=64 T=S D=8
input x[S@sp, D]
a[S, T] = x[S,D] * x[T,D]
b[S, T] = x[S,D] * x[T,D] * 2
output a
output b
""")
    assert found.count(("all_gather", "x")) == 1


def test_a_transformer_layer_sends_what_megatron_sends():
    # The residual stream stays whole over tp between layers, so each layer finishes its
    # attention and its MLP once each: a reduce-scatter and an all-gather of x[B/dp,S,D],
    # together the bytes of Megatron's all-reduce (2 (n-1)/n of it), twice per layer.
    found = collectives(chosen(load("examples/transformer/block.ein")))
    block = 2 * 64 * 128 * 4  # x per device: [B/dp, S, D] in f32
    assert sorted({(kind, nbytes) for kind, _, nbytes in found}) == [
        ("all_gather", 3 * block // 4), ("reduce_scatter", 3 * block // 4)]
    layers = 2
    assert sum(nbytes for _, _, nbytes in found) * layers == layers * 2 * (2 * 3 * block // 4)


# ---- compile time: axes of size 1 cost nothing, and the candidates per op are bounded

def _matmul_on(sizes) -> str:
    axes = " ".join(f"a{i}={size}" for i, size in enumerate(sizes))
    return (f"mesh {axes}\ndim I=256 J=512 K=1024\ninput a[I,J]\ninput b[J,K]\n"
            "c[I,K] = a[I,J] * b[J,K]\noutput c\n")


def test_axes_of_size_one_change_nothing_and_cost_nothing():
    import time

    text = Path("examples/mlp/megatron.ein").read_text()
    plain = compile_spmd(compile_source(text, "megatron.ein"))
    began = time.perf_counter()
    padded = compile_spmd(compile_source(
        text.replace("mesh dp=2 tp=4", "mesh dp=2 tp=4 u1=1 u2=1 u3=1 u4=1 u5=1"), "megatron.ein"))
    assert time.perf_counter() - began < 2.0  # it took 68 s when every axis was enumerated
    assert [str(value.layout) for value in padded.values.values()] == \
        [str(value.layout) for value in plain.values.values()]


def test_a_layout_pinned_over_an_axis_of_size_one_is_read_as_it_is():
    text = Path("examples/mlp/megatron.ein").read_text().replace(
        "mesh dp=2 tp=4", "mesh u1=1 dp=2 tp=4").replace("input x[B@dp, S, D]", "input x[B@(dp,u1), S, D]")
    program = compile_source(text, "megatron.ein")
    spmd = compile_spmd(program)
    # No move of x over u1 (0 bytes, but a step): the einsum reads x as it is held.
    assert [step.dst for step in spmd.steps if hasattr(step, "dst")] == ["y~1"]
    outputs, _ = run_simulated(program, seed=0)
    assert np.allclose(outputs["y"], run_reference(program, seed=0)["y"], atol=1e-4)


def test_a_matmul_on_eight_axes_is_searched_axis_by_axis_in_bounded_time():
    import time

    program = compile_source(_matmul_on([2] * 8), "mm.ein")
    began = time.perf_counter()
    spmd = compile_spmd(program)
    assert time.perf_counter() - began < 5.0  # 16 s when all 5^8 strategies were priced
    assert bytes_per_device(spmd.steps) == 0  # a and b replicated: splitting I and K needs no move
    (limit,) = spmd.search_limits  # W104: optimal along each axis, not proven jointly
    assert (limit.strategies, limit.axes) == (4**8, 8)


def test_a_mesh_of_two_to_the_64_devices_is_E223():
    with pytest.raises(EinparError) as caught:
        compile_source(_matmul_on([2] * 64), "mm.ein")
    (found,) = caught.value.diagnostics
    assert (found.code, found.span.line, found.span.col) == ("E223", 1, 1)
    assert found.message == ("the mesh has 18,446,744,073,709,551,616 devices; einpar handles at "
                             "most 1,048,576")


def test_sixty_four_axes_of_which_twenty_split_compile_in_bounded_time():
    import time

    began = time.perf_counter()
    compile_spmd(compile_source(_matmul_on([2] * 20 + [1] * 44), "mm.ein"))
    assert time.perf_counter() - began < 5.0


# ---- optimality: the integer program's plan against every combination of strategies

def _small_joint(program, objective):
    """The joint problem of `program` if it is small enough to enumerate, else None."""
    from math import prod

    from einpar.ir import Repeat
    from einpar.partition import JOINT_LIMIT, joint_problem
    from einpar.strategies import axis_roles

    if any(isinstance(op, Repeat) for op in program.ops):
        return None
    problem = joint_problem(program, objective)
    if any(not node for node in problem.nodes):
        return None
    combos = prod(len(node) for node in problem.nodes)
    total = sum(prod(len(axis_roles(op, program.mesh, a)) for a in program.mesh.names)
                for op in partition(program, objective).program.ops)
    return problem if combos <= 20_000 and total <= JOINT_LIMIT else None


@pytest.mark.parametrize("objective", ["bytes", "time"])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(generated=programs(max_statements=4, repeat=False, max_rank=2, max_dims=4))
def test_the_plan_is_the_exhaustive_optimum_on_small_programs(objective, generated):
    from hypothesis import assume

    from einpar.solve import exhaustive

    program = compile_source(generated.text, file="<generated>")
    chooser = make_objective(program, objective)
    problem = _small_joint(program, chooser)
    assume(problem is not None and sum(len(node) > 1 for node in problem.nodes) >= 2)
    best, _ = exhaustive(problem)
    plan = partition(program, make_objective(program, objective))
    assert plan.price == pytest.approx(best, rel=1e-9, abs=1e-9)
    # Both exact solvers on their own: the dynamic program, and the integer program (a
    # memory limit that binds nothing turns the dynamic program off).
    from dataclasses import replace

    from einpar.solve import evaluate, solve
    assert evaluate(problem, solve(problem)) == pytest.approx(best, rel=1e-9, abs=1e-9)
    unbounded = replace(problem, memory_limit=math.inf, layout_bytes=lambda value, layout: 0)
    assert evaluate(problem, solve(unbounded)) == pytest.approx(best, rel=1e-9, abs=1e-9)
    # The integer program with no memory limit (a value read by one op priced on its choices).
    from einpar.solve import _IntegerProgram
    integer_program = _IntegerProgram(problem)
    picks = integer_program.relaxed() or integer_program.integral()[0]
    assert evaluate(problem, picks) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_the_training_step_of_a_transformer_block_is_solved_by_its_lp_relaxation(monkeypatch):
    """The training step of a block is one part (the backward pass reads the forward's
    activations): the integer program of every axis has an integral LP optimum, so HiGHS
    never branches (with the looser formulation each tp axis took seconds of branching)."""
    problems = _solved_problems(monkeypatch)
    compile_spmd(load("examples/training/megatron_selective.ein"))
    integer_programs = [p.stats["solved_by"] for p in problems if "variables" in p.stats]
    assert integer_programs and set(integer_programs) == {"LP"}


def _solved_problems(monkeypatch) -> list:
    """Every Problem the search solves from now on, in order (the solves go on as before)."""
    import einpar.search
    from einpar.solve import solve

    problems = []

    def recording(problem):
        problems.append(problem)
        return solve(problem)

    monkeypatch.setattr(einpar.search, "solve", recording)
    return problems


def test_the_lp_relaxation_is_the_same_through_milp(monkeypatch):
    """The LP is solved through scipy's HiGHS binding, or scipy.optimize.milp where scipy
    has none: both find the same optimum of a Megatron training step's first axis."""
    import sys

    import scipy.optimize._highspy
    from einpar.solve import _IntegerProgram, evaluate

    problems = _solved_problems(monkeypatch)
    partition(load("examples/training/megatron_selective.ein"))
    problem = next(p for p in problems if p.stats.get("solved_by") == "LP")
    through_binding = _IntegerProgram(problem).relaxed()
    monkeypatch.delattr(scipy.optimize._highspy, "_core")
    monkeypatch.setitem(sys.modules, "scipy.optimize._highspy._core", None)
    through_milp = _IntegerProgram(problem).relaxed()
    assert through_binding is not None and through_milp is not None
    assert evaluate(problem, through_binding) == pytest.approx(evaluate(problem, through_milp),
                                                               rel=1e-9)


def test_the_same_program_gives_the_same_plan():
    from einpar.spmd import format_spmd

    program = load("examples/transformer/block.ein")
    first = format_spmd(compile_spmd(program))
    assert all(format_spmd(compile_spmd(load("examples/transformer/block.ein"))) == first
               for _ in range(2))


# ---- the program set: the five failure patterns of an op-by-op partitioner

SET = Path(__file__).parent / "partition_programs"
# Bytes per device of the byte-minimal plan, derived by hand (each file's header says how).
MINIMUM_BYTES = {
    "p1_cp_qkv.ein": 49_152, "p1_fsdp_tied.ein": 286_720, "p1_sp_swiglu.ein": 24_576,
    "p2_expand_then_seq.ein": 3_072, "p2_scores_to_heads.ein": 3_072,
    "p3_reward_head.ein": 96, "p3_two_matmul_chain.ein": 192,
    "p4_scores_constraint.ein": 24_576, "p4_up_proj_seq.ein": 3_072,
    "p5_gated_up_proj.ein": 3_072, "p5_gather_x_or_w.ein": 3_072,
}


def test_the_set_has_two_programs_of_each_pattern():
    patterns = [name.split("_")[0] for name in MINIMUM_BYTES]
    assert sorted(set(patterns)) == ["p1", "p2", "p3", "p4", "p5"]
    assert all(patterns.count(p) >= 2 for p in set(patterns))
    assert sorted(path.name for path in SET.glob("*.ein")) == sorted(MINIMUM_BYTES)


@pytest.mark.parametrize("name", sorted(MINIMUM_BYTES))
def test_the_byte_objective_reaches_the_hand_derived_minimum(name):
    program = load(SET / name)
    spmd = compile_spmd(program, objective="bytes")
    assert bytes_per_device(spmd.steps) == MINIMUM_BYTES[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MINIMUM_BYTES))
def test_the_axis_by_axis_search_finds_the_joint_optimum_on_the_set(name):
    """The set's programs are solved axis by axis by default; over all axes at once (slower,
    exact) the integer program finds no cheaper plan."""
    import einpar.search as module

    program = load(SET / name)
    plan = partition(program, make_objective(program, "time"))
    saved = module.JOINT_LIMIT
    try:
        module.JOINT_LIMIT = 10**9
        exact = partition(program, make_objective(program, "time"))
    finally:
        module.JOINT_LIMIT = saved
    assert plan.price == pytest.approx(exact.price, rel=1e-9)
    assert all(step.alternative is None or step.alternative.extra >= 0 for step in plan.steps)


# ---- memory is a constraint

SMALL_H100 = """{"name": "h100-2mib", "accelerator": {"base": "h100", "hbm_capacity": 2097152},
 "topology": {"kind": "switched", "gpus_per_node": 4, "nodes": 1}}"""


def test_a_plan_that_does_not_fit_is_not_chosen_when_one_that_fits_exists(tmp_path):
    from einpar.cost_model.cluster import load_cluster, preset
    from einpar.cost_model.estimate import estimate

    program = load("examples/matmul/case4_same_axis_noncontracting.ein")
    roomy = estimate(program, compile_spmd(program, preset("h100x4")), preset("h100x4"))
    (tmp_path / "small.json").write_text(SMALL_H100)
    small = load_cluster(str(tmp_path / "small.json"))
    tight = estimate(program, compile_spmd(program, small), small)
    # The fastest plan needs 2.9 MiB per device; on a device of 2 MiB a slower one that fits.
    assert roomy.peak_memory_bytes > 2 * 2**20 >= tight.peak_memory_bytes
    assert tight.fits and tight.step_time_s > roomy.step_time_s
    outputs, _ = run_simulated(program, seed=0)
    assert np.allclose(outputs["c"], run_reference(program, seed=0)["c"], rtol=1e-4, atol=1e-4)


def test_a_memory_limit_bounds_the_values_and_copies_of_the_plan():
    from einpar.errors import EinparError

    program = load("examples/matmul/case4_same_axis_noncontracting.ein")
    objective = make_objective(program)
    free = partition(program, objective)
    limited = partition(program, objective, memory_limit=2_200_000)
    assert limited.price > free.price
    with pytest.raises(EinparError):  # less than the result's own block: no plan
        partition(program, objective, memory_limit=1_000)


# ---- found in review: each once a wrong result, a crash or a costlier plan

def _matches_reference(text: str, objective: str = "time"):
    from helpers import assert_matches_reference

    from einpar.api import random_inputs
    from einpar.backends.numpy_sim import run_spmd

    program = compile_source(text, "review.ein")
    spmd = compile_spmd(program, objective=objective)
    inputs = random_inputs(program, 3)
    outputs, _ = run_spmd(spmd, inputs)
    assert_matches_reference(program, outputs, inputs)
    return spmd


@pytest.mark.parametrize("last", ["h[T@a, E] = 2 * cumsum[T](g[T,E])",
                                  "h[T@a, E, C@b] = 2 * route[E,C](g[T,E], k=1)"])
def test_the_axis_by_axis_search_never_splits_an_index_that_must_stay_whole(last):
    # The pin asks for T split over a; cumsum runs along T and route's tokens are T, so they
    # must compute with T whole (and move after), even when the search starts from the pin.
    _matches_reference("mesh a=2 b=2 c=2\ndim T=8 D=4 E=4 C=4\ninput x[T@a,D]\ninput w[D,E]\n"
                       "g[T,E] = x[T,D] * w[D,E] + x[T,D] * w[D,E]\n" + last + "\noutput h\n")


def test_a_partial_pin_over_an_axis_of_size_one_is_the_value_itself():
    from einpar.spmd import collectives

    for rhs in ("x[A]", "x[A] * 2"):
        spmd = _matches_reference(f"mesh tp=2 pp=1\ndim A=4\ninput x[A@tp]\n"
                                  f"y[A]{{sum: pp}} = {rhs}\noutput y\n")
        assert not any("pp" in c.step.axes for c in collectives(spmd))


def test_a_value_pinned_partial_stays_partial_through_the_linear_ops_after_it():
    text = ("mesh dp=2 tp=2\ndim B=4 D=8 F=8\ninput x[B@dp, D]\nparam w1[D@tp, F]\n"
            "y[B,F]{sum: tp} = x[B,D] * w1[D,F]\nz[B,F]{sum: tp} = y[B,F] / 4\noutput z\n")
    _matches_reference(text)
    # Megatron's pin costs nothing more than leaving the choice to einpar.
    pinned = ("mesh tp=4\ndim B=64 D=64 F=64 G=64\ninput x[B, D@tp]\nparam w1[D@tp, F]\n"
              "param w2[F, G]\ny[B,F]{sum: tp} = x[B,D] * w1[D,F]\nz[B,F] = y[B,F] * 3\n"
              "u[B,G@tp] = z[B,F] * w2[F,G]\noutput u\n")
    free = pinned.replace("{sum: tp}", "")
    assert bytes_per_device(_matches_reference(pinned, "bytes").steps) == \
        bytes_per_device(_matches_reference(free, "bytes").steps) == 12_288


def test_parts_alike_but_for_which_inputs_they_read_are_priced_apart():
    # a reads x twice, b reads z and u: alike in shapes, not in what moves.
    program = compile_source("mesh tp=4\ndim I=8 J=I K=I\ninput x[I@tp,J]\ninput z[I@tp,J]\n"
                             "input u[I@tp,J]\na[I,K]{} = x[I,J] * x[J,K]\n"
                             "b[I,K]{} = z[I,J] * u[J,K]\noutput a\noutput b\n", "alike.ein")
    plan, spmd = compile_program(program, make_objective(program, "bytes"))
    assert round(plan.price) == bytes_per_device(spmd.steps) == 576


def test_the_plan_prices_fsdps_second_gather_of_a_weight_for_the_backward_pass():
    """FSDP frees a gathered weight after the forward pass and gathers it again for the
    backward pass (lower.py); the partitioner prices that second gather, so the plan's price
    in bytes is what the lowered step sends. mlp_fsdp (dp=8): w1 and w2 (bf16, 512 KiB)
    gathered for the forward pass (7/8 of 512 KiB each), w2 again for h's gradient (w1's
    gradient does not read w1), both gradients reduce-scattered, and the loss's sum."""
    from einpar.spmd import collectives

    program = load(Path(__file__).parent.parent / "examples/training/mlp_fsdp.ein")
    partitioned, spmd = compile_program(program, make_objective(program, "bytes"))
    assert [(c.kind, c.src) for c in collectives(spmd)] == [
        ("all_gather", "w1"), ("all_gather", "w2"), ("all_reduce", "l.sum"), ("all_gather", "w2"),
        ("reduce_scatter", "w1.grad"), ("reduce_scatter", "w2.grad")]
    sent = 5 * 917_504 + 56
    assert bytes_per_device(spmd.steps) == sent
    assert partitioned.price == pytest.approx(sent, abs=1)  # bytes, FLOPs weigh < 1 byte
