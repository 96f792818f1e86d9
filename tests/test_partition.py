"""The partitioner's choices on the textbook cases: exact collectives and bytes."""

from einpar.api import compile_source, load
from einpar.partition import Decision, RepeatDecision, partition
from einpar.reshard import AllGather, AllReduce, AllToAll, ReduceScatter

MATMUL = """\
mesh y=4
dim I={I} J={J} K={K}
input a[{a}]
input b[{b}]
c[{c}] = a[I,J] * b[J,K]
output c[{c}]
"""


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
    return partition(compile_source(MATMUL.format(I=I, J=J, K=K, a=a, b=b, c=c)))


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
    kinds = [kind for kind, _, _ in collectives(partition(load("examples/moe/gshard.ein")))]
    assert kinds == ["all_to_all", "all_to_all"]


def test_megatron_mlp_all_reduces_the_partial_output():
    assert collectives(partition(load("examples/mlp/megatron.ein"))) == \
        [("all_reduce", "y", 2 * 3 * (4 * 128 * 256 // 4) * 4)]
