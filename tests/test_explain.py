"""`einpar explain`: goldens on every example, grids checked against the simulator, slides."""

import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from einpar.api import compile_source, compile_spmd, load, random_inputs
from einpar.backends.numpy_sim import assemble, run_spmd
from einpar.backends.reference import _Evaluator
from einpar.tolerance import program_tolerance
from einpar.cli import main
from einpar.cost_model.cluster import preset
from einpar.cost_model.collectives import collective_time
from einpar.explain import explain
from einpar.explain_view import block_text, shown_values
from einpar.layout import group_of
from einpar.lower import compile_program
from einpar.spmd import bytes_per_device

from helpers import EXAMPLES, GOLDENS, ROOT, golden_path


def explained(example: Path, cluster=None):
    program = load(example)
    partitioned, spmd = compile_program(program)
    return program, partitioned, spmd, explain(spmd, example.read_text(), cluster)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_explain_matches_its_golden_file(example, golden, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["explain", str(example.relative_to(ROOT))]) == 0
    golden(golden_path(example, ".explain"), capsys.readouterr().out)


def test_every_explain_golden_has_its_example():
    expected = {golden_path(example, ".explain").name for example in EXAMPLES}
    assert {path.name for path in GOLDENS.glob("*.explain")} <= expected


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_the_grid_shows_the_blocks_the_simulated_devices_hold(example):
    """Every range in every cell, against the block each simulated device really holds."""
    if example.parent.name == "pipeline":  # its stages hold values per micro-batch (no --values)
        pytest.skip("a pipeline's values are per stage and micro-batch: test_pipeline.py")
    program, partitioned, spmd, explanation = explained(example)
    inputs = random_inputs(program, seed=0)
    record = {}
    run_spmd(spmd, inputs, record=record)
    whole = dict(inputs)  # every value of the (expanded) program on one device
    _Evaluator().run(partitioned.program.ops, whole)
    mesh = spmd.mesh
    checked = 0
    for statement in explanation.statements:
        if statement.trips > 1:
            continue  # a loop body's values change from trip to trip
        for _, held, moved in shown_values(statement):
            for value in (held, moved):
                if value is None:
                    continue
                base = value.name.split("~")[0]
                expected = whole[base]
                blocks = record[value.name]
                for device in range(mesh.num_devices):
                    ranges = value.block(mesh, device)
                    # The real part of the block the device holds (padded where uneven).
                    assert blocks[device].shape == value.local_shape(mesh)
                    assert all(stop - start == min(n, max(0, size - start)) for (start, stop), n, size
                               in zip(ranges, value.local_shape(mesh), value.shape))
                # Partial blocks add up (over their groups) to the whole value's block.
                together = assemble(blocks, value.layout, value.shape, mesh)
                scale = float(np.max(np.abs(expected), initial=1.0))
                # The program's tolerance: a bf16 step's partial sums round apart.
                rtol = max(1e-4, program_tolerance(program))
                np.testing.assert_allclose(np.asarray(together, np.float64),
                                           np.asarray(expected, np.float64),
                                           rtol=rtol, atol=rtol / 10 * scale)
                for device in range(mesh.num_devices):
                    if not value.layout.partial:
                        where = tuple(slice(start, stop) for start, stop in value.block(mesh, device))
                        real = tuple(slice(0, stop - start) for start, stop in value.block(mesh, device))
                        np.testing.assert_array_equal(blocks[device][real], together[where])
                checked += 1
    # Every collective of the program is in exactly one statement's moves.
    assert sum(s.bytes_per_device * s.trips for s in explanation.statements) == \
        bytes_per_device(spmd.steps)
    in_loops = all(statement.trips > 1 for statement in explanation.statements)
    assert checked >= 2 or in_loops  # a loop body's values are checked by test_simulator


def test_the_rule_says_why_in_words():
    *_, explanation = explained(ROOT / "examples/matmul/case3_both_contracting_split.ein")
    (statement,) = explanation.statements
    assert statement.rules == ["index J is contracted and split over y in both operands, so each "
                               "device computes a partial sum of c"]
    (move,) = statement.movements
    assert move.call == "reduce_scatter[y](c, sum -> I)"
    assert move.groups == ((0, 1, 2, 3),)
    assert move.bytes_per_device == 3 * 256 * 1024 * 4 // 4
    assert move.sentence == (
        "c is a partial sum over y, and the program asks for f32[256@y,1024]: a reduce-scatter "
        "over y combines the partials and leaves each device its block of I, 768 KiB per device")


def test_an_all_reduce_is_explained_with_its_groups():
    *_, explanation = explained(ROOT / "examples/mlp/megatron.ein")
    y = next(s for s in explanation.statements if s.name == "y")
    assert "index F is contracted and split over tp in both operands, so each device computes a " \
           "partial sum of y" in y.rules
    (move,) = y.movements
    assert move.kind == "all_reduce"
    assert move.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert move.sentence.startswith("y is a partial sum over tp, and the program asks for ")


def test_a_cluster_times_each_collective_as_the_cost_model_does():
    cluster = preset("h100x8")
    _, _, spmd, explanation = explained(ROOT / "examples/attention/tensor_parallel.ein", cluster)
    moves = [m for s in explanation.statements for m in s.movements]
    assert [m.call for m in moves] == ["all_reduce[tp](y, sum)"]  # Megatron's y, partial over tp
    y = spmd.values["y"]
    expected = collective_time("all_reduce", ("tp",), 4 * 128 * 256 * 4, spmd.mesh, cluster)
    assert moves[0].time_s == expected.time_s > 0
    assert moves[0].how == expected.how == f"ring/{expected.protocol} of 4 on nvlink"
    assert y.local_shape(spmd.mesh) == (4, 128, 256)


def test_groups_are_the_devices_that_differ_only_along_the_axes():
    *_, explanation = explained(ROOT / "examples/attention/tensor_parallel.ein")
    for statement in explanation.statements:
        for move in statement.movements:
            devices = sorted(d for group in move.groups for d in group)
            assert devices == list(range(8))
            for group in move.groups:
                assert list(group) == group_of(explanation.mesh, group[0], move.axes)


def test_one_statement_and_one_device(capsys):
    assert main(["explain", "examples/attention/tensor_parallel.ein", "--statement", "y",
                 "--device", "5"]) == 0
    printed = capsys.readouterr().out
    assert "9. line 20  y[B@dp,S,D] = o[B,S,H,K] * wo[H,K,D]" in printed
    assert "1. line" not in printed
    assert "device 5 highlighted" in printed
    assert main(["explain", "examples/attention/tensor_parallel.ein", "--statement", "9"]) == 0
    assert "9. line 20" in capsys.readouterr().out


def test_values_are_the_simulated_devices_numbers(capsys):
    assert main(["explain", "examples/matmul/case3_both_contracting_split.ein", "--values",
                 "--set", "I=4", "J=4", "K=2", "--device", "2"]) == 0
    printed = capsys.readouterr().out
    program = load(ROOT / "examples/matmul/case3_both_contracting_split.ein",
                   overrides={"I": 4, "J": 4, "K": 2})
    inputs = random_inputs(program, seed=0)
    c = inputs["a"] @ inputs["b"]
    with np.printoptions(precision=3, suppress=True, threshold=32, edgeitems=2, linewidth=60):
        row = str(c[2:3].astype(np.float32))  # device 2 holds row block 2 of I=4 over y=4
    assert "c after" in printed and "a before" in printed
    for line in row.splitlines():
        assert line.strip() in printed


def test_bad_statement_or_device_is_a_usage_error(capsys):
    assert main(["explain", "examples/matmul/case1_no_contracting_split.ein", "--statement", "9"]) == 2
    assert "no statement '9'; the program's statements are: 1 c" in capsys.readouterr().err
    assert main(["explain", "examples/matmul/case1_no_contracting_split.ein", "--device", "8"]) == 2
    assert "no device 8; the mesh has 8 devices, 0 to 7" in capsys.readouterr().err


def test_json_lists_each_device_blocks(capsys):
    assert main(["explain", "examples/matmul/case3_both_contracting_split.ein", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    (statement,) = document["statements"]
    assert statement["devices"][1] == {"a": "J 128:256", "b": "J 128:256", "c": "partial Σy -> I 64:128"}
    assert statement["collectives"][0]["bytes_per_device"] == 786432


@pytest.mark.parametrize("command", [["explain"], ["compile"]])
def test_slides_are_valid_svg_and_html_with_every_device(command, tmp_path, capsys):
    svg, html = tmp_path / "view.svg", tmp_path / "view.html"
    example = "examples/attention/tensor_parallel.ein"
    assert main(command + [example, "--svg", str(svg), "--html", str(html)]) == 0
    root = ElementTree.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = "".join(root.itertext()).replace("\xa0", " ")
    page = html.read_text()
    if command == ["explain"]:
        for device in range(8):
            assert re.search(rf"\bd{device}\b", text)
            assert re.search(rf"\bd{device}\b", page)
    assert "all_reduce[tp](y, sum)" in text and "all_reduce[tp](y, sum)" in page
    assert f"SVG written to {svg}" in capsys.readouterr().out


def test_slides_never_overwrite_without_force(tmp_path, capsys):
    svg = tmp_path / "talk.svg"
    svg.write_text("mine")
    example = "examples/matmul/case1_no_contracting_split.ein"
    assert main(["explain", example, "--svg", str(svg)]) == 2
    assert f"{svg} exists; pass --force to overwrite it" in capsys.readouterr().err
    assert svg.read_text() == "mine"
    assert main(["explain", example, "--svg", str(svg), "--force"]) == 0
    assert svg.read_text().startswith("<svg")


def test_a_mesh_of_three_axes_gets_one_grid_per_slice(tmp_path, capsys):
    program = tmp_path / "cube.ein"
    program.write_text("mesh a=2 b=2 c=2\ndim I=8 J=8\ninput x[I@a, J@(b,c)]\n"
                       "y[I,J] = x[I,J] * 2\noutput y\n")
    assert main(["explain", str(program)]) == 0
    printed = capsys.readouterr().out
    assert "a=0" in printed and "a=1" in printed
    assert re.search(r"x I 4:8 · J 6:8", printed)  # device 7: a=1, b=1, c=1


def test_the_python_api_explains_too():
    import einpar.api as ein

    program = ein.load("examples/matmul/case3_both_contracting_split.ein")
    explanation = ein.explain(program)
    assert [m.call for s in explanation.statements for m in s.movements] == \
        ["reduce_scatter[y](c, sum -> I)"]
    assert explanation.statements[0].source == "c[I@y, K] = a[I,J] * b[J,K]"


@pytest.mark.parametrize("argv, message", [
    (["explain", "examples/matmul/case1_no_contracting_split.ein", "--json", "--svg", "a.svg"],
     "--svg and --html save the view as printed; they do not go with --json"),
    (["compile", "examples/matmul/case1_no_contracting_split.ein", "--emit", "ir", "--svg", "a.svg"],
     "--svg and --html save the spmd or layouts view, not --emit ir"),
    (["explain", "examples/matmul/case1_no_contracting_split.ein", "--json", "--values"],
     "--values shows the numbers in the view; it does not go with --json"),
])
def test_options_that_do_not_go_together_are_usage_errors(argv, message, tmp_path, monkeypatch,
                                                           capsys):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in (captured.out if "--json" in argv else captured.err)  # E303 under --json
    assert not (tmp_path / "a.svg").exists()


def test_a_compile_slide_is_as_wide_as_its_longest_line(tmp_path, capsys):
    svg = tmp_path / "c.svg"
    assert main(["compile", "examples/transformer/block.ein", "--svg", str(svg)]) == 0
    printed = capsys.readouterr().out.splitlines()[:-1]  # less "SVG written to ..."
    longest = max(printed, key=len)
    assert longest.endswith("= all_reduce[tp](x#2.1, sum)  # 98,304 B/device: x reads x")
    assert len(longest) > 100  # wider than the slide's default width
    # Each line of the slide is one row of text: none is wrapped.
    rows: dict[float, str] = {}
    for text in ElementTree.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}text"):
        y = float(text.get("y"))
        rows[y] = rows.get(y, "") + "".join(text.itertext()).replace("\xa0", " ")
    assert longest + "\n" in rows.values()


def test_a_mesh_too_big_to_draw_shows_one_device_on_request(capsys):
    argv = ["explain", "examples/transformer/block.ein", "--set", "dp=128", "B=256",
            "--statement", "7"]
    assert main(argv) == 0
    assert "(512 devices: too many cells to draw; pick one with --device)" in capsys.readouterr().out
    assert main(argv + ["--device", "77"]) == 0
    printed = capsys.readouterr().out
    assert "(device 77 of 512, at dp=19, tp=1)" in printed
    # B=256 over dp=128 gives it rows 38:40; H=8 over tp=4, heads 2:4; x#2 is whole over tp.
    assert re.search(r"^o +B 38:40 · H 2:4$", printed, re.MULTILINE)
    assert re.search(r"^x#2 +B 38:40$", printed, re.MULTILINE)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_no_cell_is_cropped(example, monkeypatch, capsys):
    """A grid too wide for the page is folded into rows of whole cells, never cut short."""
    monkeypatch.chdir(ROOT)
    assert main(["explain", str(example.relative_to(ROOT)), "--width", "80"]) == 0
    assert "…" not in capsys.readouterr().out


def test_a_folded_grid_titles_each_cell_with_its_coordinates(capsys):
    assert main(["explain", "examples/transformer/block.ein", "--statement", "7",
                 "--width", "70"]) == 0
    printed = capsys.readouterr().out
    assert "devices in row-major order of dp=2 × tp=4" in printed
    assert "d6 dp=1,tp=2" in printed


def test_outputs_moved_to_their_layouts_get_an_entry_of_their_own(tmp_path):
    # y and z are pinned split along I, so each output's layout needs a move of its own.
    source = ("mesh tp=4\ndim I=8 J=8\ninput x[I@tp, J]\ny[I@tp,J] = x[I,J] * 2\n"
              "z[I@tp,J] = x[I,J] + 1\noutput y[I, J@tp]\noutput z[I, J]\n")
    program = compile_source(source, "two.ein")
    spmd = compile_spmd(program)
    outputs = explain(spmd, source).statements[-1]
    assert outputs.name == "output" and outputs.source == "output y, z"
    assert [m.call for m in outputs.movements] == ["all_to_all[tp](y, I -> J)",
                                                   "all_gather[tp](z, I)"]
    assert [(name, block_text(held, spmd.mesh, 1), block_text(moved, spmd.mesh, 1))
            for name, held, moved in shown_values(outputs)] == \
        [("y", "I 2:4", "J 2:4"), ("z", "I 2:4", "whole")]
