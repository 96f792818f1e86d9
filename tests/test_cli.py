"""The `einpar` command, called in-process as `main(argv)`.

Exit codes: 0 success, 1 a problem in the user's program or its inputs, 2 bad
usage of the command. A user's mistake is a diagnostic on stderr, never a
Python traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from einpar.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(path.relative_to(REPO).as_posix() for path in (REPO / "examples").rglob("*.ein"))
MLP = "examples/mlp/megatron.ein"

# A tiny program whose result is easy to compute by hand: c = a @ b.
MATVEC = """\
dim I=2 J=3
input a[I, J]
input b[J]
c[I] = a[I,J] * b[J]
output c
"""

# Line 3 uses a tensor that does not exist.
BAD = """\
dim B=8
input x[B]
y[B] = z[B]
output y
"""


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch directory holding prog.ein (MATVEC) and bad.ein (BAD), made current."""
    (tmp_path / "prog.ein").write_text(MATVEC)
    (tmp_path / "bad.ein").write_text(BAD)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def einpar(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(output: str) -> dict[str, list[str]]:
    """Rows of a printed table by their first cell."""
    rows = {}
    for line in output.splitlines():
        if "│" in line:
            cells = [cell.strip() for cell in line.split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def assert_no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text
        assert "internal error" not in text


# ---------------------------------------------------------------- check


def test_check_prints_tensors_shapes_layouts_and_flops(capsys, in_repo):
    code, out, err = einpar(capsys, "check", MLP)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{MLP}: ok"
    assert lines[1] == "mesh dp=2 tp=4 (8 devices), dtype f32"
    assert lines[2] == "dims B=8 S=128 D=256 F=1024"
    assert table_rows(out) == {
        "x": ["input", "f32[8,128,256]", "[B@dp,S,D]", "1.00 MiB"],
        "w1": ["param", "f32[256,1024]", "[D,F@tp]", "1.00 MiB"],
        "w2": ["param", "f32[1024,256]", "[F@tp,D]", "1.00 MiB"],
        "h": ["def", "f32[8,128,1024]", "[B,S,F]", "4.00 MiB"],
        "y": ["def", "f32[8,128,256]", "[B@dp,S,D]", "1.00 MiB"],
    }
    assert "ops: 2 einsum, 1 map" in lines
    assert "outputs: y" in lines
    # Two contractions of 2·8·128·256·1024 FLOPs each, and one gelu per element of h.
    assert lines[-1] == "FLOPs: 1.07G (1,074,790,400)"


@pytest.mark.parametrize("example", EXAMPLES)
def test_check_accepts_every_example(capsys, in_repo, example):
    code, out, err = einpar(capsys, "check", example)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"{example}: ok"


def test_check_json_summarises_the_program(capsys, in_repo):
    code, out, err = einpar(capsys, "check", MLP, "--json")
    assert (code, err) == (0, "")
    summary = json.loads(out)
    assert set(summary) == {"file", "mesh", "devices", "dims", "dtype", "tensors", "outputs", "ops", "flops",
                            "warnings"}
    assert summary["warnings"] == []
    assert summary["file"] == MLP
    assert summary["mesh"] == {"dp": 2, "tp": 4}
    assert summary["devices"] == 8
    assert summary["dims"] == {"B": 8, "S": 128, "D": 256, "F": 1024}
    assert summary["dtype"] == "f32"
    assert summary["outputs"] == ["y"]
    assert summary["ops"] == {"Einsum": 2, "Map": 1}
    assert summary["flops"] == 1_074_790_400
    assert [t["name"] for t in summary["tensors"]] == ["x", "w1", "w2", "h", "y"]
    assert summary["tensors"][0] == {"name": "x", "kind": "input", "dtype": "f32",
                                     "indices": ["B", "S", "D"], "shape": [8, 128, 256],
                                     "layout": "[B@dp,S,D]", "bytes": 8 * 128 * 256 * 4}


def test_set_changes_dims_and_mesh_axes(capsys, in_repo):
    code, out, err = einpar(capsys, "check", MLP, "--json", "--set", "D=512", "tp=8")
    assert (code, err) == (0, "")
    summary = json.loads(out)
    assert summary["mesh"] == {"dp": 2, "tp": 8}
    assert summary["devices"] == 16
    assert summary["dims"]["D"] == 512
    shapes = {t["name"]: t["shape"] for t in summary["tensors"]}
    assert shapes == {"x": [8, 128, 512], "w1": [512, 1024], "w2": [1024, 512],
                      "h": [8, 128, 1024], "y": [8, 128, 512]}


def test_set_may_be_given_more_than_once(capsys, in_repo):
    code, out, _ = einpar(capsys, "check", MLP, "--json", "--set", "D=512", "--set", "tp=8")
    assert code == 0
    assert json.loads(out)["mesh"] == {"dp": 2, "tp": 8}


def test_set_of_an_alias_target_moves_the_alias(capsys, in_repo):
    code, out, _ = einpar(capsys, "check", "examples/attention/data_parallel.ein", "--json",
                          "--set", "S=64")
    assert code == 0
    assert json.loads(out)["dims"]["T"] == 64


def test_program_saved_with_a_byte_order_mark_checks(capsys, workdir):
    Path("bom.ein").write_bytes(b"\xef\xbb\xbf" + MATVEC.encode())
    code, out, err = einpar(capsys, "check", "bom.ein")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "bom.ein: ok"


# ---------------------------------------------------------------- a problem in the program


def test_bad_program_exits_1_with_the_diagnostic_on_stderr(capsys, workdir):
    code, out, err = einpar(capsys, "check", "bad.ein")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "error[E201]: unknown tensor 'z'",
        " --> bad.ein:3:8",
        "  |",
        "3 | y[B] = z[B]",
        "  |        ^",
        "  |",
        "  = hint: declare it with `input` or `param`, or define it with a statement",
    ]
    assert_no_traceback(err)


@pytest.mark.parametrize("command", [["run"], ["compile", "--emit", "ir"]])
def test_bad_program_exits_1_from_every_command(capsys, workdir, command):
    code, out, err = einpar(capsys, command[0], "bad.ein", *command[1:])
    assert (code, out) == (1, "")
    assert err.startswith("error[E201]: unknown tensor 'z'\n")
    assert_no_traceback(err)


def test_syntax_error_exits_1_even_for_emit_ast(capsys, workdir):
    Path("bad.ein").write_text("dim B=8\ninput x[B, $]\n")
    code, out, err = einpar(capsys, "compile", "bad.ein", "--emit", "ast")
    assert (code, out) == (1, "")
    assert err.splitlines()[:2] == ["error[E100]: unexpected character '$'", " --> bad.ein:2:12"]


def test_several_errors_are_all_printed_and_counted(capsys, workdir):
    Path("bad.ein").write_text(BAD + "output q\n")
    code, _, err = einpar(capsys, "check", "bad.ein")
    assert code == 1
    headers = [line for line in err.splitlines() if line.startswith("error[")]
    assert headers == ["error[E201]: unknown tensor 'z'", "error[E232]: output 'q' is never defined"]
    assert err.splitlines()[-1] == "2 errors"


def test_bad_program_with_json_prints_the_diagnostics_as_json(capsys, workdir):
    code, out, err = einpar(capsys, "check", "bad.ein", "--json")
    assert (code, err) == (1, "")
    assert json.loads(out) == {"diagnostics": [{
        "code": "E201", "severity": "error", "message": "unknown tensor 'z'",
        "file": "bad.ein", "line": 3, "col": 8, "end_line": 3, "end_col": 9,
        "hint": "declare it with `input` or `param`, or define it with a statement"}]}


def test_set_making_a_layout_uneven_pads_it(capsys, in_repo):
    code, out, _ = einpar(capsys, "compile", MLP, "--set", "tp=3")
    assert code == 0
    assert "in   w1: f32[256,1024@tp] local [256,340 of 342]" in out.splitlines()


# ---------------------------------------------------------------- bad usage


def test_unknown_subcommand_exits_2(capsys, workdir):
    code, out, err = einpar(capsys, "frobnicate", "prog.ein")
    assert (code, out) == (2, "")
    assert "invalid choice: 'frobnicate'" in err
    assert_no_traceback(err)


def test_no_subcommand_exits_2(capsys, workdir):
    code, out, err = einpar(capsys)
    assert (code, out) == (2, "")
    assert err.startswith("usage: einpar")


def test_missing_file_argument_exits_2(capsys, workdir):
    code, _, err = einpar(capsys, "check")
    assert code == 2
    assert "the following arguments are required: file" in err


def test_missing_program_file_exits_2(capsys, workdir):
    code, out, err = einpar(capsys, "check", "missing.ein")
    assert (code, out) == (2, "")
    assert err.splitlines() == ["error[E302]: missing.ein does not exist"]


def test_malformed_set_exits_2(capsys, workdir):
    code, _, err = einpar(capsys, "check", "prog.ein", "--set", "I")
    assert code == 2
    assert err.splitlines()[0] == "error[E301]: cannot read --set 'I'"


def test_set_naming_something_the_program_lacks_exits_2(capsys, workdir):
    code, _, err = einpar(capsys, "check", "prog.ein", "--set", "K=4")
    assert code == 2
    assert err.splitlines() == [
        "error[E301]: --set names K, which is neither a dim nor a mesh axis of prog.ein",
        "  = hint: this program's dims and mesh axes are: I, J",
    ]


@pytest.mark.parametrize("argv", [
    ["compile", "prog.ein", "--emit", "nonsense"],
    ["run", "prog.ein", "--backend", "nonsense"],
    ["run", "prog.ein", "--seed", "one"],
    ["check", "prog.ein", "--no-such-flag"],
])
def test_bad_options_exit_2(capsys, workdir, argv):
    code, out, err = einpar(capsys, *argv)
    assert (code, out) == (2, "")
    assert "error:" in err
    assert_no_traceback(err)


def test_help_exits_0(capsys):
    code, out, _ = einpar(capsys, "--help")
    assert code == 0
    assert "check" in out and "run" in out and "compile" in out


# ---------------------------------------------------------------- run


def test_run_with_random_inputs_from_a_seed(capsys, workdir):
    code, out, err = einpar(capsys, "run", "prog.ein", "--backend", "reference", "--seed", "3")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "prog.ein on backend reference (random inputs, seed 3)"
    assert table_rows(out)["c"][0] == "float32[2]"


def test_run_is_reproducible_from_its_seed(capsys, workdir):
    def mean(seed: str) -> float:
        code, out, _ = einpar(capsys, "run", "prog.ein", "--seed", seed, "--json")
        assert code == 0
        return json.loads(out)["outputs"]["c"]["mean"]

    assert mean("3") == mean("3")
    assert mean("3") != mean("4")


def test_run_json_describes_each_output(capsys, workdir):
    code, out, _ = einpar(capsys, "run", "prog.ein", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["backend"] == "reference"
    assert set(document["outputs"]) == {"c"}
    assert document["outputs"]["c"]["dtype"] == "float32"
    assert document["outputs"]["c"]["shape"] == [2]


def test_run_with_an_inputs_file_and_save(capsys, workdir):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1.0, -1.0, 2.0], dtype=np.float32)
    np.savez("in.npz", a=a, b=b)
    code, out, err = einpar(capsys, "run", "prog.ein", "--backend", "reference",
                            "--inputs", "in.npz", "--save", "out.npz")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "prog.ein on backend reference (in.npz)"
    assert out.splitlines()[-1] == "saved c to out.npz"
    with np.load("out.npz") as saved:
        assert saved.files == ["c"]
        np.testing.assert_allclose(saved["c"], a @ b)
        assert saved["c"].dtype == np.float32


def test_run_with_an_inputs_file_missing_an_array_exits_1(capsys, workdir):
    np.savez("in.npz", a=np.zeros((2, 3)))
    code, out, err = einpar(capsys, "run", "prog.ein", "--inputs", "in.npz")
    assert (code, out) == (1, "")
    assert err.splitlines() == ["error[E300]: in.npz has no array 'b'", "  = hint: 'b' is f32[3]"]


def test_run_with_a_mis_shaped_input_exits_1(capsys, workdir):
    np.savez("in.npz", a=np.zeros((3, 2)), b=np.zeros(3))
    code, out, err = einpar(capsys, "run", "prog.ein", "--inputs", "in.npz")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "error[E300]: 'a' in in.npz has shape [3, 2], but prog.ein declares [2, 3]",
        "  = hint: 'a' is f32[2, 3]",
    ]


def test_run_with_a_corrupt_compressed_inputs_file_exits_1(capsys, workdir):
    """A compressed member that does not inflate (zlib's error) is the file's problem."""
    np.savez_compressed("in.npz", a=np.arange(600.0).reshape(2, 300)[:, :3].copy(),
                        b=np.linspace(0, 1, 3))
    data = bytearray(Path("in.npz").read_bytes())
    start = data.index(b"PK\x03\x04") + 30 + len("a.npy") + 20  # inside a's deflated bytes
    data[start:start + 30] = b"\xff" * 30
    Path("in.npz").write_bytes(bytes(data))
    code, out, err = einpar(capsys, "run", "prog.ein", "--inputs", "in.npz")
    assert (code, out) == (1, "")
    assert err.startswith("error[E300]: cannot read inputs file in.npz: ")


def test_run_with_a_missing_inputs_file_exits_1(capsys, workdir):
    code, _, err = einpar(capsys, "run", "prog.ein", "--inputs", "missing.npz")
    assert code == 1
    assert err.splitlines() == ["error[E300]: inputs file missing.npz does not exist"]


def test_save_refuses_to_overwrite_without_force(capsys, workdir):
    Path("out.npz").write_bytes(b"precious")
    code, out, err = einpar(capsys, "run", "prog.ein", "--save", "out.npz")
    assert (code, out) == (2, "")
    assert err.strip() == "einpar run: error: out.npz exists; pass --force to overwrite it"
    assert Path("out.npz").read_bytes() == b"precious"


def test_save_overwrites_with_force(capsys, workdir):
    Path("out.npz").write_bytes(b"precious")
    code, _, _ = einpar(capsys, "run", "prog.ein", "--save", "out.npz", "--force")
    assert code == 0
    with np.load("out.npz") as saved:
        assert saved["c"].shape == (2,)


def test_save_without_the_npz_suffix_never_overwrites_silently(capsys, workdir):
    # NumPy adds ".npz" to a name without it; an existing out.npz must survive `--save out`.
    Path("out.npz").write_bytes(b"precious")
    code, out, _ = einpar(capsys, "run", "prog.ein", "--save", "out")
    assert Path("out.npz").read_bytes() == b"precious"
    if code == 0:
        saved_to = out.splitlines()[-1].removeprefix("saved c to ")
        with np.load(saved_to) as saved:
            assert saved["c"].shape == (2,)
    else:
        assert code == 2


def test_save_into_a_missing_directory_is_a_usage_error(capsys, workdir):
    code, _, err = einpar(capsys, "run", "prog.ein", "--save", "no/such/dir/out.npz")
    assert code == 2
    assert "no/such/dir" in err
    assert_no_traceback(err)


# ---------------------------------------------------------------- compile


def test_compile_emit_ast_prints_the_syntax_tree(capsys, workdir):
    code, out, err = einpar(capsys, "compile", "prog.ein", "--emit", "ast")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "Module prog.ein",
        "  Dim I=2 J=3  @1:1",
        "  Input a[I, J]  @2:1",
        "  Input b[J]  @3:1",
        "  Statement c[I]  @4:1",
        "    Binary *  @4:8",
        "      TensorRef a[I, J]  @4:8",
        "      TensorRef b[J]  @4:17",
        "  Output c  @5:1",
    ]


def test_compile_emit_ir_prints_the_checked_program(capsys, workdir):
    code, out, err = einpar(capsys, "compile", "prog.ein", "--emit", "ir")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "program prog.ein",
        "mesh (one device)",
        "dims I=2 J=3",
        "dtype f32",
        "input  a: f32[I=2,J=3]",
        "input  b: f32[J=3]",
        "c: f32[I=2] = einsum(a[I,J], b[J])  # line 4",
        "output c",
    ]


def test_compile_emit_ir_shows_layouts_and_overrides(capsys, in_repo):
    code, out, _ = einpar(capsys, "compile", MLP, "--emit", "ir", "--set", "tp=8")
    assert code == 0
    assert "param  w1: f32[D=256,F=1024@tp]" in out.splitlines()
    assert "mesh dp=2 tp=8" in out.splitlines()


# ---------------------------------------------------------------- the installed command


def installed_einpar() -> str:
    beside_python = Path(sys.executable).parent / "einpar"
    found = str(beside_python) if beside_python.exists() else shutil.which("einpar")
    assert found, "the einpar console script is not installed"
    return found


def test_installed_command_reports_a_bad_program_without_a_traceback(tmp_path):
    (tmp_path / "bad.ein").write_text(BAD)
    result = subprocess.run([installed_einpar(), "check", "bad.ein"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert "error[E201]: unknown tensor 'z'" in result.stderr
    assert " --> bad.ein:3:8" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_does_not_import_jax(tmp_path):
    (tmp_path / "prog.ein").write_text(MATVEC)
    script = ("import sys; from einpar.cli import main; code = main(['check', 'prog.ein']); "
              "sys.exit(code or (3 if 'jax' in sys.modules else 0))")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the per-device program

CASE3 = "examples/matmul/case3_both_contracting_split.ein"


def test_compile_prints_the_per_device_program_by_default(capsys, in_repo):
    code, out, err = einpar(capsys, "compile", CASE3)
    assert code == 0, err
    assert "in   a: f32[256,512@y] local [256,128]" in out
    assert "c: f32[256,1024] {sum: y} local [256,1024] = einsum(a[I,J], b[J,K])" in out
    assert "reduce_scatter[y](c, sum -> I)  # 786,432 B/device" in out
    assert out.rstrip().endswith("# 1 collectives, 786,432 bytes sent per device")


def test_compile_json_follows_the_documented_schema(capsys, in_repo):
    code, out, _ = einpar(capsys, "compile", CASE3, "--json")
    document = json.loads(out)
    assert document["mesh"] == {"y": 4} and document["devices"] == 4
    assert document["collectives"] == [{
        "kind": "reduce_scatter", "axes": ["y"], "tensor": "c", "src": "f32[256,1024] {sum: y}",
        "dst": "f32[256@y,1024]", "bytes_per_device": 786432}]
    assert document["totals"] == {"bytes_per_device": 786432,
                                  "flops_per_device": 2 * 256 * 128 * 1024}
    values = {value["name"]: value for value in document["values"]}
    assert values["c~1"] == {"name": "c~1", "tensor": "c", "global_shape": [256, 1024],
                             "dtype": "f32", "layout": "f32[256@y,1024]", "local_shape": [64, 1024]}


def test_compile_emit_layouts_lists_every_value(capsys, in_repo):
    code, out, _ = einpar(capsys, "compile", CASE3, "--emit", "layouts")
    rows = table_rows(out)
    assert rows["c~1"] == ["c", "f32[256@y,1024]", "[64,1024]", "256 KiB"]


def test_run_on_simulated_devices_matches_the_reference(capsys, in_repo):
    code, out, err = einpar(capsys, "run", "examples/moe/gshard.ein", "--backend", "numpy")
    assert code == 0, err
    assert "on 4 simulated devices" in out
    assert "each device sent 196,608 bytes" in out


def test_run_on_simulated_devices_exits_1_on_a_mismatch(capsys, in_repo, monkeypatch):
    import einpar.backends.numpy_sim as numpy_sim

    real = numpy_sim.run_spmd

    def wrong(program, inputs, **options):
        outputs, traffic = real(program, inputs, **options)
        return {name: array + 1 for name, array in outputs.items()}, traffic

    monkeypatch.setattr(numpy_sim, "run_spmd", wrong)
    code, out, _ = einpar(capsys, "run", CASE3, "--backend", "numpy")
    assert code == 1
    assert "MISMATCH" in out


# ---------------------------------------------------------------- bad input, nothing runs away

import signal  # noqa: E402
import tracemalloc  # noqa: E402
import zipfile  # noqa: E402

from einpar import resources  # noqa: E402
from einpar.api import compile_source, compile_spmd, random_inputs  # noqa: E402

# A repeat whose trips, not its FLOPs, are the work: L is set per test.
LOOP = """\
dim B=4 L=10
input x[B]
h[B] = x[B]
repeat L {
  h[B] = h[B] * 0.5
}
output h
"""


@pytest.fixture
def loop(workdir):
    (workdir / "loop.ein").write_text(LOOP)
    return workdir


@pytest.mark.parametrize("value", ["²", "٣", "3²", "0x10", "+4", "-4", "4.0"])
def test_set_takes_ascii_digits_only(capsys, workdir, value):
    code, out, err = einpar(capsys, "run", "prog.ein", "--set", f"I={value}")
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == f"error[E301]: cannot read --set 'I={value}'"


def test_set_sizes_obey_the_limit_on_sizes_in_a_file(capsys, workdir):
    code, out, err = einpar(capsys, "check", "prog.ein", "--set", "I=1" + "0" * 30)
    assert (code, out) == (2, "")
    assert err.splitlines() == ["error[E223]: --set I=100000000000... has 31 digits",
                                "  = hint: sizes have at most 18 digits"]


@pytest.mark.parametrize("argv", [
    ["run", "prog.ein", "--seed", "-1"],
    ["run", "prog.ein", "--seed", "4294967296"],
    ["run", "prog.ein", "--seed", "٣"],
    ["explain", "prog.ein", "--values", "--seed", "-1"],
    ["run", "prog.ein", "--backend", "jax", "--devices", "9" * 20],
    ["run", "prog.ein", "--backend", "jax", "--devices", "²"],
    ["run", "prog.ein", "--backend", "jax", "--repeat", "9" * 21],
    ["run", "prog.ein", "--backend", "jax", "--warmup", "9" * 21],
    ["run", "prog.ein", "--backend", "jax", "--timeout", "nan"],
    ["run", "prog.ein", "--backend", "jax", "--timeout", "inf"],
    ["run", "prog.ein", "--backend", "jax", "--timeout", "1e300"],
    ["run", "prog.ein", "--backend", "jax", "--coordinator", "garbage", "--num-processes", "2",
     "--process-id", "0"],
    ["run", "prog.ein", "--backend", "jax", "--coordinator", "host:99999", "--num-processes", "2",
     "--process-id", "0"],
    ["run", "prog.ein", "--backend", "jax", "--coordinator", "host:1", "--num-processes", "9" * 20,
     "--process-id", "0"],
    ["run", "prog.ein", "--max-memory", "lots"],
    ["run", "prog.ein", "--max-memory", "0"],
    ["run", "prog.ein", "--max-memory", "2iB"],
    ["run", "prog.ein", "--max-time", "forever"],
    ["run", "prog.ein", "--max-time", "0s"],
    ["explain", "prog.ein", "--width", "1000000000"],
    ["explain", "prog.ein", "--device", "²"],
    ["explain", "prog.ein", "--statement", "²"],
    ["compile", "prog.ein", "--width", "0"],
    ["calibrate", "--devices", "9" * 20],
])
def test_command_line_values_are_usage_errors(capsys, workdir, argv):
    code, out, err = einpar(capsys, *argv)
    assert (code, out) == (2, ""), err
    assert "error" in err
    assert_no_traceback(err)


def test_coordinator_from_the_environment_is_checked(capsys, workdir, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "no port")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    code, out, err = einpar(capsys, "run", "prog.ein", "--backend", "jax")
    assert (code, out) == (2, "")
    assert err.strip() == ("einpar run: error: JAX_COORDINATOR_ADDRESS must be HOST:PORT (e.g. "
                           "10.0.0.1:8476, a port from 1 to 65535), got 'no port'")


def test_sizes_read_with_units():
    assert resources.parse_size("2GiB") == 2 * 2**30
    assert resources.parse_size("2 GiB") == 2 * 2**30
    assert resources.parse_size("2G") == 2 * 2**30
    assert resources.parse_size("1.5MB") == 1_500_000
    assert resources.parse_size("512") == 512
    assert resources.parse_size("3kB") == 3000
    for bad in ("", "GiB", "2Q", "2iB", "2Gi", "-1", "0", "1e9", "２GiB", "nan"):
        with pytest.raises(ValueError):
            resources.parse_size(bad)
    assert resources.parse_duration("90") == 90
    assert resources.parse_duration("30min") == 1800
    assert resources.parse_duration("2h") == 7200
    assert resources.parse_duration("1d") == 86400
    for bad in ("", "h", "0", "-5s", "inf", "nan", "5 years"):
        with pytest.raises(ValueError):
            resources.parse_duration(bad)


def test_available_memory_is_the_least_of_the_kernel_and_the_cgroup(tmp_path):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    cgroup.mkdir()
    (proc / "meminfo").write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\n"
                                  "MemAvailable:    8000000 kB\n")
    assert resources.available_memory(str(proc), str(cgroup)) == 8_000_000 * 1024
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert resources.available_memory(str(proc), str(cgroup)) == 8_000_000 * 1024
    (cgroup / "memory.max").write_text(f"{2**30}\n")
    (cgroup / "memory.current").write_text(f"{2**28}\n")
    assert resources.available_memory(str(proc), str(cgroup)) == 2**30 - 2**28


def _no_inputs_made(monkeypatch):
    """Fail the test if a run gets as far as making its inputs."""
    import einpar.api as api

    def refuse(*_, **__):
        raise AssertionError("inputs were made before the memory check")

    monkeypatch.setattr(api, "random_inputs", refuse)
    monkeypatch.setattr(api, "load_inputs", refuse)


@pytest.mark.parametrize("backend", ["reference", "numpy", "jax"])
def test_run_needing_more_memory_than_the_machine_has_is_refused_before_it_starts(
        capsys, workdir, monkeypatch, backend):
    _no_inputs_made(monkeypatch)
    monkeypatch.setattr(resources, "available_memory", lambda: 2**30)
    code, out, err = einpar(capsys, "run", "prog.ein", "--backend", backend,
                            "--set", "I=100000000", "J=100")
    assert (code, out) == (1, "")
    first, hint = err.splitlines()[:2]
    assert first.startswith(f"error[E420]: running on backend {backend} needs about ")
    assert first.endswith(" of memory; this machine has 1.00 GiB available")
    assert hint.startswith("  = hint: make dims smaller with --set, or pass --max-memory ")


def test_max_memory_sets_the_limit(capsys, workdir, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 2**40)
    # I=2**20, J=3: the inputs a (12 MiB) and b (12 B), the output c (4 MiB), and c's float64
    # statistics (16 B an element, 16 MiB): 32 MiB and 12 B.
    code, out, err = einpar(capsys, "run", "prog.ein", "--set", f"I={2**20}", "--max-memory", "1MiB")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "error[E420]: running on backend reference needs about 32.0 MiB of memory; --max-memory is 1.00 MiB",
        "  = hint: make dims smaller with --set, or pass --max-memory 33MiB to try anyway"]
    limit = str(32 * 2**20 + 12)
    code, _, err = einpar(capsys, "run", "prog.ein", "--set", f"I={2**20}", "--max-memory", limit)
    assert code == 0, err
    code, _, err = einpar(capsys, "run", "prog.ein", "--set", f"I={2**20}", "--max-memory",
                          str(int(limit) - 1))
    assert code == 1


def test_explain_values_needing_too_much_memory_is_refused(capsys, workdir, monkeypatch):
    _no_inputs_made(monkeypatch)
    code, out, err = einpar(capsys, "explain", "prog.ein", "--values", "--set", "I=100000000",
                            "--max-memory", "1GiB")
    assert (code, out) == (1, "")
    assert err.splitlines()[0].startswith("error[E420]: simulating every device for --values "
                                          "needs about ")


@pytest.mark.parametrize("backend", ["reference", "numpy"])
def test_memory_estimate_covers_what_a_run_allocates(capsys, in_repo, backend):
    """NumPy reports its allocations to tracemalloc: the peak of a real run is within the
    estimate (give or take 4 MiB of the interpreter's own objects: compiling, printing), and
    the estimate is not wildly above it."""
    file, dims = "examples/matmul/case1_no_contracting_split.ein", ["I=4096"]
    program = compile_source(Path(file).read_text(), file, {"I": 4096})
    spmd = None if backend == "reference" else compile_spmd(program)
    estimate = resources.estimate_run(program, backend, spmd).bytes
    tracemalloc.start()
    try:
        code, _, err = einpar(capsys, "run", file, "--backend", backend, "--set", *dims)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0, err
    assert peak <= estimate + 4 * 2**20
    assert estimate <= 2 * peak


def test_random_inputs_are_drawn_in_their_own_dtype():
    program = compile_source("dim I=262144\ninput a[I]\ninput h[I] : bf16\ninput k[I] : i32\n"
                             "input m[I] : bool\ny[I] = a[I]\noutput y\n")
    tracemalloc.start()
    try:
        arrays = random_inputs(program, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [str(arrays[n].dtype) for n in "ahkm"] == ["float32", "bfloat16", "int32", "bool"]
    held = sum(array.nbytes for array in arrays.values())  # 4 + 2 + 4 + 1 bytes a point
    # The largest temporary is the float32 draw of the bf16 input (4 bytes a point), not a
    # float64 draw of any (8).
    assert peak <= held + 4 * 262144 + 65536
    assert np.all((arrays["k"] >= 0) & (arrays["k"] <= 9))


def test_run_that_cannot_finish_within_the_limit_is_refused(capsys, loop):
    code, out, err = einpar(capsys, "run", "loop.ein", "--set", "L=1000000000")
    assert (code, out) == (1, "")
    first, hint = err.splitlines()
    assert first.startswith("error[E421]: running on backend reference would take at least ")
    assert "1,000,000,001 NumPy calls" in first
    assert hint == "  = hint: make it smaller with --set, or pass --max-time 2h to run it anyway"


def test_max_time_sets_the_limit(capsys, loop):
    # 1001 calls of at least 5 µs: more than a millisecond, less than a minute.
    code, _, err = einpar(capsys, "run", "loop.ein", "--set", "L=1000", "--max-time", "0.001s")
    assert code == 1
    assert err.startswith("error[E421]: running on backend reference would take at least ")
    code, _, err = einpar(capsys, "run", "loop.ein", "--set", "L=1000", "--max-time", "1min")
    assert code == 0, err


def test_jax_run_with_too_many_steps_is_refused(capsys, workdir):
    code, _, err = einpar(capsys, "run", "prog.ein", "--backend", "jax", "--repeat", "1000000",
                          "--max-time", "1s")
    assert code == 1
    assert err.startswith("error[E421]: running on backend jax would take at least ")
    assert "1,000,003 JAX steps" in err


def test_program_file_larger_than_any_program_is_refused(capsys, workdir):
    Path("huge.ein").write_bytes(b" " * (16 * 2**20 + 1))
    code, out, err = einpar(capsys, "check", "huge.ein")
    assert (code, out) == (1, "")
    assert err.splitlines() == ["error[E302]: huge.ein is larger than 16 MiB, too large for a .ein "
                                "program", "  = hint: is it the right file?"]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_check_of_an_endless_file_stops(capsys, workdir):
    code, _, err = einpar(capsys, "check", "/dev/zero")
    assert code == 1
    assert err.splitlines()[0] == ("error[E302]: /dev/zero is larger than 16 MiB, too large for a "
                                   ".ein program")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_inputs_from_a_device_are_refused(capsys, workdir):
    code, _, err = einpar(capsys, "run", "prog.ein", "--inputs", "/dev/zero")
    assert code == 1
    assert err.splitlines()[0] == "error[E300]: inputs file /dev/zero is not a regular file"


def _npz_with_headers(path: str, members: dict[str, tuple[int, ...]]) -> None:
    """An .npz whose members' headers claim these shapes (float32) and hold no data."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, shape in members.items():
            with archive.open(name, "w") as member:
                np.lib.format.write_array_header_1_0(
                    member, {"descr": "<f4", "fortran_order": False, "shape": shape})


def test_inputs_whose_headers_claim_huge_arrays_are_refused_unread(capsys, workdir):
    _npz_with_headers("in.npz", {"a.npy": (2**40, 3), "b.npy": (0,), "c.npy": (2**50,),
                                 "notes.txt": ()})
    code, _, err = einpar(capsys, "run", "prog.ein", "--inputs", "in.npz")
    assert code == 1
    assert err.splitlines() == [
        "error[E300]: in.npz holds 'notes.txt', which is not an array (.npy)",
        "  = hint: write it with numpy.savez(path, name=array, ...)",
        "error[E300]: 'a' in in.npz has shape [1099511627776, 3], but prog.ein declares [2, 3]",
        "  = hint: 'a' is f32[2, 3]",
        "error[E300]: 'b' in in.npz has shape [0], but prog.ein declares [3]",
        "  = hint: 'b' is f32[3]",
        "error[E300]: in.npz has an array 'c' that prog.ein does not declare",
        "  = hint: inputs and params are: a, b",
        "4 errors"]


def test_inputs_file_of_compressed_zeros_is_refused_before_decompressing(capsys, workdir):
    # 256 MiB of zeros in about 256 KiB, named as an input of the wrong shape.
    with zipfile.ZipFile("in.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("a.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "<f4", "fortran_order": False, "shape": (2**26,)})
            zeros = bytes(2**24)
            for _ in range(16):
                member.write(zeros)
        with archive.open("b.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros(3, np.float32))
    tracemalloc.start()
    try:
        code, _, err = einpar(capsys, "run", "prog.ein", "--inputs", "in.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 1
    assert err.splitlines()[0] == ("error[E300]: 'a' in in.npz has shape [67108864], but prog.ein "
                                   "declares [2, 3]")
    assert peak < 2**24


KEYWORD_OUTPUTS = """\
dim I=3
input x[I]
file[I] = x[I] * 2
allow_pickle[I] = x[I] + 1
output file
output allow_pickle
"""


@pytest.mark.parametrize("backend", ["reference", "numpy"])
def test_save_keeps_outputs_named_like_savez_arguments(capsys, workdir, backend):
    Path("kw.ein").write_text(KEYWORD_OUTPUTS)
    x = np.array([1.0, 2.0, 3.0], np.float32)
    np.savez("in.npz", x=x)
    code, out, err = einpar(capsys, "run", "kw.ein", "--backend", backend, "--inputs", "in.npz",
                            "--save", "out.npz")
    assert code == 0, err
    assert out.splitlines()[-1] == "saved file, allow_pickle to out.npz"
    with np.load("out.npz") as saved:
        assert saved.files == ["file", "allow_pickle"]
        np.testing.assert_array_equal(saved["file"], x * 2)
        np.testing.assert_array_equal(saved["allow_pickle"], x + 1)


@pytest.mark.parametrize("backend", ["reference", "numpy", "jax"])
def test_save_never_writes_through_a_link(capsys, workdir, backend):
    os.symlink(workdir / "elsewhere.npz", "out.npz")  # dangling
    code, out, err = einpar(capsys, "run", "prog.ein", "--backend", backend, "--save", "out.npz",
                            "--force")
    assert (code, out) == (2, "")
    assert err.strip() == ("einpar run: error: cannot write out.npz: it is a symbolic link; "
                           "name the file itself")
    assert not (workdir / "elsewhere.npz").exists()


@pytest.mark.parametrize("backend", ["reference", "numpy", "jax"])
def test_save_to_a_folder_is_a_usage_error(capsys, workdir, backend):
    os.mkdir("out.npz")
    code, out, err = einpar(capsys, "run", "prog.ein", "--backend", backend, "--save", "out.npz",
                            "--force")
    assert (code, out) == (2, "")
    assert err.strip() == "einpar run: error: cannot write out.npz: it is a folder"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
@pytest.mark.parametrize("backend", ["reference", "numpy"])
def test_save_into_a_read_only_folder_is_a_usage_error(capsys, workdir, backend):
    os.mkdir("locked")
    os.chmod("locked", 0o500)
    try:
        code, out, err = einpar(capsys, "run", "prog.ein", "--backend", backend, "--save",
                                "locked/out.npz")
    finally:
        os.chmod("locked", 0o700)
    assert (code, out) == (2, "")
    assert err.strip() == "einpar run: error: cannot write locked/out.npz: permission denied in folder locked"


def test_write_failing_midway_is_a_usage_error(capsys, workdir, monkeypatch):
    import einpar.cli as cli

    def full(path, arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "save_outputs", full)
    code, _, err = einpar(capsys, "run", "prog.ein", "--backend", "numpy", "--save", "out.npz")
    assert code == 2
    assert err.strip() == "einpar run: error: cannot write out.npz: No space left on device"


@pytest.mark.parametrize("argv", [
    ["compile", "prog.ein", "--svg", "slide.svg"],
    ["explain", "prog.ein", "--html", "slide.svg"],
    ["cost", "prog.ein", "--cluster", "h100x8", "--trace", "slide.svg"],
    ["calibrate", "--out", "slide.svg"],
])
def test_no_writer_follows_a_link(capsys, workdir, argv):
    os.symlink(workdir / "elsewhere", "slide.svg")
    code, _, err = einpar(capsys, *argv, "--force")
    assert code == 2
    assert err.strip().endswith("cannot write slide.svg: it is a symbolic link; name the file itself")
    assert not (workdir / "elsewhere").exists()


def test_ctrl_c_ends_a_command_with_one_line(capsys, workdir, monkeypatch):
    import einpar.backends.reference as reference

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(reference, "evaluate", interrupted)
    code, out, err = einpar(capsys, "run", "prog.ein")
    assert (code, out, err) == (130, "", "einpar: interrupted\n")


def test_ctrl_c_stops_a_long_run(loop):
    """A real SIGINT to the installed command, in the middle of a long repeat."""
    command = [sys.executable, "-m", "einpar", "run", "loop.ein", "--set", "L=100000000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time

        time.sleep(4)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert (process.returncode, out, err) == (130, "", "einpar: interrupted\n")


def test_progress_ticks_once_per_op_and_step(in_repo):
    from einpar.backends.numpy_sim import run_spmd
    from einpar.backends.reference import evaluate

    program = compile_source(LOOP, "loop.ein", {"L": 7})
    spmd = compile_spmd(program)
    inputs = random_inputs(program)
    ticks = []
    evaluate(program, inputs, tick=lambda: ticks.append(1))
    assert len(ticks) == resources.reference_calls(program.ops) == 1 + 7
    ticks.clear()
    run_spmd(spmd, inputs, tick=lambda: ticks.append(1))
    assert len(ticks) == resources.simulator_steps(spmd.steps) >= 8


def test_a_long_run_shows_a_progress_bar_on_a_terminal(capsys, loop, monkeypatch):
    import io

    import einpar.cli as cli
    import einpar.progress as progress
    from rich.console import Console

    terminal = io.StringIO()
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(cli, "_consoles", lambda: (
        Console(highlight=False, soft_wrap=True),
        Console(file=terminal, force_terminal=True, width=120)))
    code = main(["run", "loop.ein", "--set", "L=3000"])
    assert code == 0
    assert "loop.ein on reference" in terminal.getvalue()
    assert "/3001" in terminal.getvalue()
    terminal.truncate(0)
    code = main(["run", "loop.ein", "--set", "L=3000", "--json"])
    assert code == 0
    assert terminal.getvalue().strip("\x00") == ""
