"""Pipelined programs (`repeat L@pp`) lowered and run stage by stage on the simulator.

Each schedule, with pp combined with dp and tp, on an MLP stack and on the GPT
example: every output (loss, updated params, optimizer state) equals the
unpipelined reference, and the bytes sent between stages are exactly one
carried value per micro-batch per boundary each way.
"""

from __future__ import annotations

import re

import pytest

import einpar.api as ein
from einpar.backends.numpy_sim import run_spmd
from einpar.backends.reference import evaluate
from einpar.layout import device_coords
from einpar.tolerance import compare, program_tolerance

from helpers import ROOT

SCHEDULES = {"gpipe": "schedule gpipe", "1f1b": "schedule 1f1b", "interleaved": "schedule interleaved v=2"}


def mlp_stack(mesh: str = "dp=2 pp=2 tp=2", schedule: str = "1f1b", microbatches: int = 4,
              layers: int = 8) -> str:
    """An embedding, a stack of residual MLP layers pipelined over pp, a linear head and a
    squared-error loss, trained with AdamW."""
    tp = "@tp" if "tp" in mesh else ""
    dp = "@dp" if "dp" in mesh else ""
    return (f"mesh {mesh}\ndim B=8 D=4 E=4 F=8 V=16 L={layers}\ninput ids[B{dp}]: i32\n"
            f"input y[B{dp}, E]\nparam emb[V, D]\nx[B,D] = take[V](emb[V,D], ids[B])\n"
            f"repeat L@pp {{\n  param w1[D, F{tp}]\n  param w2[F{tp}, D]\n"
            f"  x[B,D] = x[B,D] + tanh(x[B,E] * w1[E,F]) * w2[F,D]\n}}\n"
            f"param wo[D, E]\no[B,E] = x[B,D] * wo[D,E]\nl[] = mean[B,E](square(o[B,E] - y[B,E]))\n"
            f"loss l\nmicrobatches B={microbatches}\n{SCHEDULES[schedule]}\noptimizer adamw lr=0.01\n")


def assert_runs_as_the_reference(program, seed: int = 0):
    inputs = ein.random_inputs(program, seed)
    reference = evaluate(program, inputs)
    spmd = ein.compile_spmd(program)
    assert spmd.pipeline is not None
    outputs, traffic = run_spmd(spmd, inputs)
    tolerance = program_tolerance(program)
    for output in program.outputs:
        found = compare(output.name, reference[output.name], outputs[output.name], tolerance)
        assert found.ok, (output.name, found.error, tolerance)
    return spmd, traffic


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("mesh", ["dp=2 pp=2 tp=2", "pp=4 tp=2", "dp=2 pp=4"])
def test_every_schedule_trains_an_mlp_stack_as_the_reference_does(schedule, mesh):
    assert_runs_as_the_reference(ein.compile_source(mlp_stack(mesh, schedule), file="mlp.ein"))


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_the_gpt_example_pipelined_trains_as_the_reference_does(schedule):
    """examples/training/gpt.ein (rotary tables made before the layers and read in every
    stage, causal attention, a vocabulary-parallel head) on dp=2 pp=2 tp=2."""
    text = (ROOT / "examples/training/gpt.ein").read_text()
    text = text.replace("mesh dp=2 tp=4", "mesh dp=2 pp=2 tp=2").replace("repeat L {", "repeat L@pp {")
    text = re.sub(r"\bL=2\b", "L=4", text) + f"microbatches B=2\n{SCHEDULES[schedule]}\n"
    assert_runs_as_the_reference(ein.compile_source(text, file="gpt.ein"))


def test_a_forward_program_runs_its_layers_stage_after_stage():
    text = ("mesh pp=4 tp=2\ndim B=4 D=8 E=8 F=8 L=8\ninput x[B, D]\nrepeat L@pp {\n"
            "  param w[D, F@tp]\n  param u[F@tp, D]\n  x[B,D] = x[B,D] + tanh(x[B,E] * w[E,F]) * u[F,D]\n"
            "}\ny[B,D] = square(x[B,D])\noutput y\n")
    spmd, traffic = assert_runs_as_the_reference(ein.compile_source(text, file="fwd.ein"))
    assert spmd.pipeline.schedule.name == "gpipe" and spmd.pipeline.schedule.microbatches == 1
    # One activation x (4 x 8 float32) from each stage to the next; the last sends none.
    for device, sent in enumerate(traffic.between_stages):
        stage = device_coords(spmd.pipeline.mesh, device)["pp"]
        assert sent == (128 if stage < 3 else 0)


# ---- the JAX backend: shard_map over the whole mesh, the schedule in lockstep ticks


def assert_jax_runs_as_the_reference(program, twin: bool = False):
    inputs = ein.random_inputs(program, 0)
    reference = evaluate(program, inputs)
    result = ein.run_jax(program, inputs, warmup=0, repeat=1, twin=twin)
    assert len(result.devices.devices) == program.mesh.num_devices
    tolerance = program_tolerance(program)
    for output in program.outputs:
        found = compare(output.name, reference[output.name], result.outputs[output.name], tolerance)
        assert found.ok, (output.name, found.error, tolerance)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_jax_trains_an_mlp_stack_as_the_reference_does_on_every_schedule(schedule):
    """pp with dp and tp on 8 CPU devices; interleaved stages hold trips that are not
    adjacent (the stacks put in stage order on the host, the outputs back in order)."""
    assert_jax_runs_as_the_reference(ein.compile_source(mlp_stack("dp=2 pp=2 tp=2", schedule),
                                                        file="mlp.ein"))


@pytest.mark.parametrize("mesh", ["pp=4 tp=2", "dp=2 pp=4"])
def test_jax_runs_four_stages_interleaved(mesh):
    assert_jax_runs_as_the_reference(ein.compile_source(mlp_stack(mesh, "interleaved"), file="mlp.ein"))


def test_jax_runs_a_forward_program_stage_after_stage():
    text = ("mesh pp=4 tp=2\ndim B=4 D=8 E=8 F=8 L=8\ninput x[B, D]\nrepeat L@pp {\n"
            "  param w[D, F@tp]\n  param u[F@tp, D]\n  x[B,D] = x[B,D] + tanh(x[B,E] * w[E,F]) * u[F,D]\n"
            "}\ny[B,D] = square(x[B,D])\noutput y\n")
    assert_jax_runs_as_the_reference(ein.compile_source(text, file="fwd.ein"))


def test_jax_twin_of_a_pipelined_program_takes_the_stacks_in_their_own_order():
    assert_jax_runs_as_the_reference(ein.compile_source(mlp_stack(schedule="interleaved"),
                                                        file="mlp.ein"), twin=True)


@pytest.mark.parametrize("schedule", [pytest.param("gpipe", marks=pytest.mark.slow), "1f1b",
                                      pytest.param("interleaved", marks=pytest.mark.slow)])
def test_jax_trains_the_gpt_example_pipelined_as_the_reference_does(schedule):
    """The transformer block (rotary tables read in every stage, causal attention, a
    vocabulary-parallel head): about 6 s each on 2 cores, two of them marked slow."""
    text = (ROOT / "examples/training/gpt.ein").read_text()
    text = text.replace("mesh dp=2 tp=4", "mesh dp=2 pp=2 tp=2").replace("repeat L {", "repeat L@pp {")
    text = re.sub(r"\bL=2\b", "L=4", text) + f"microbatches B=2\n{SCHEDULES[schedule]}\n"
    assert_jax_runs_as_the_reference(ein.compile_source(text, file="gpt.ein"))


@pytest.mark.slow
@pytest.mark.parametrize("schedule, mesh", [("1f1b", "pp=2 dp=2 tp=2"),
                                            ("interleaved", "dp=2 pp=2 tp=2")])
def test_jax_two_processes_run_a_pipeline_as_the_reference_does(schedule, mesh, tmp_path):
    """Two processes of four CPU devices each run the step; each checks its own blocks of
    every output against the reference. Devices are in row-major order: with pp first each
    process is one stage (the stages' ppermute goes between processes), with dp first each
    process holds both stages of one dp row (the data-parallel reductions go between them)."""
    from helpers import run_two_processes

    path = tmp_path / "mlp.ein"
    path.write_text(mlp_stack(mesh, schedule))
    for document in run_two_processes([str(path), "--backend", "jax"]):
        assert document["planned_bytes_per_device"] is None  # one stage's plan is not the step's
        for name, found in document["outputs"].items():
            assert found["ok"] is True, (name, found)


def test_the_emitted_module_shows_the_schedule():
    """The per-stage slot order and the lockstep table, tick by tick, as data with a picture."""
    text = ein.emit_jax(ein.compile_source(mlp_stack(schedule="1f1b"), file="mlp.ein"))
    lines = text.splitlines()
    assert any(line.startswith("MESH = (('dp', 2), ('pp', 2), ('tp', 2))  #") for line in lines)
    assert "#   stage 0 (trips 0, 1, 2, 3): F0 F1 B0 F2 B1 F3 B2 B3" in lines
    assert "#   stage 1 (trips 4, 5, 6, 7): F0 B0 F1 B1 F2 B2 F3 B3" in lines
    start = lines.index("SCHEDULE = (")
    assert lines[start + 1] == "    ((1, 0, 0), (0, 0, 0)),  # tick   0:    F0     --"
    assert lines[start + 2] == "    ((1, 1, 0), (1, 0, 0)),  # tick   1:    F1     F0"
    assert lines[start + 3] == "    ((0, 0, 0), (2, 0, 0)),  # tick   2:    --     B0"
    assert "    'w1': ((8, 4, 8), jnp.float32, P('pp', None, 'tp'), 4)," in lines
    assert "lax.ppermute(sent, 'pp', perm=[(0, 1), (1, 0)])" in text


def carried_bytes(spmd) -> tuple[int, int]:
    """The local bytes of the values the pipelined forward and backward loops carry."""
    from einpar.layout import local_bytes
    from einpar.spmd import RepeatStep, walk_steps

    sizes = []
    for step in walk_steps(spmd.steps):
        if isinstance(step, RepeatStep) and step.dim == spmd.pipeline.dim:
            values = [spmd.values[before] for before, _, _, _ in step.carried]
            sizes.append(sum(local_bytes(v.layout, v.type.shape, v.type.dtype, spmd.mesh) for v in values))
    return sizes[0], sizes[1] if len(sizes) > 1 else 0


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_stages_send_one_activation_and_one_gradient_per_micro_batch_and_boundary(schedule):
    """Forward: each virtual stage but the last sends the carried x of each micro-batch to
    the next; backward: each but the first sends its gradient to the one before; each the
    local size of the carried value. Stage k holds v virtual stages."""
    m, p, v = 4, 2, 2 if schedule == "interleaved" else 1
    spmd, traffic = assert_runs_as_the_reference(
        ein.compile_source(mlp_stack("dp=2 pp=2 tp=2", schedule, m), file="mlp.ein"))
    forward, backward = carried_bytes(spmd)
    assert forward == backward > 0  # x (a micro-batch's rows, D=4, float32) and its gradient
    for device, sent in enumerate(traffic.between_stages):
        stage = device_coords(spmd.pipeline.mesh, device)["pp"]
        forwards = m * v - (m if stage == p - 1 else 0)
        backwards = m * v - (m if stage == 0 else 0)
        assert sent == forwards * forward + backwards * backward, (device, sent)
    assert all(total > between for total, between in zip(traffic.sent, traffic.between_stages))


def test_steps_outside_the_layers_run_where_their_values_are():
    """The embedding on the first stage, the loss and the head on the last, each layer's
    gradient accumulated and updated on every stage for its own trips."""
    spmd = ein.compile_spmd(ein.compile_source(mlp_stack(), file="mlp.ein"))
    placement = spmd.pipeline.placement
    assert placement["x"] == {0}
    assert placement["l"] == {1} and placement["wo.new"] == {1}
    assert placement["emb.new"] == {0}
    assert placement["w1.new"] == {0, 1} and placement["w2.grad.mean"] == {0, 1}
    assert spmd.pipeline.stage_trips == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_interleaved_stages_hold_every_p_th_chunk():
    spmd = ein.compile_spmd(ein.compile_source(mlp_stack(schedule="interleaved"), file="mlp.ein"))
    assert spmd.pipeline.stage_trips == ((0, 1, 4, 5), (2, 3, 6, 7))
    from einpar.spmd import format_spmd

    shown = format_spmd(spmd).splitlines()
    assert shown[1] == ("# pipelined over pp: 2 stages run this program, each on its 4 devices with "
                        "4 of the 8 trips of L; schedule interleaved, 4 micro-batches, 2 chunks per stage")
    assert shown[2:4] == ["#   stage 0: trips 0-1, 4-5", "#   stage 1: trips 2-3, 6-7"]


def test_the_cli_runs_a_pipeline_on_the_simulator(tmp_path, capsys):
    from einpar.cli import main

    path = tmp_path / "mlp.ein"
    path.write_text(mlp_stack())
    assert main(["run", str(path), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "largest error" in out
    assert float(re.search(r"largest error ([0-9.e+-]+)", out).group(1)) < 1e-5


# ---- the cost model


def priced(text: str, cluster: str = "a100x8"):
    from einpar.cost_model.cluster import load_cluster
    from einpar.cost_model.estimate import estimate

    program = ein.compile_source(text, file="p.ein")
    spmd = ein.compile_spmd(program)
    return program, spmd, estimate(program, spmd, load_cluster(cluster))


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_the_cost_model_counts_the_bytes_the_simulator_sends(schedule):
    """Per stage: every byte its devices send (its own collectives, and to other stages)
    as priced equals what the simulator sends."""
    program, spmd, estimate = priced(mlp_stack("dp=2 pp=2 tp=2", schedule))
    _, traffic = run_spmd(spmd, ein.random_inputs(program, 0))
    figures = estimate.pipeline
    for device in range(spmd.pipeline.mesh.num_devices):
        stage = device_coords(spmd.pipeline.mesh, device)["pp"]
        assert traffic.sent[device] == figures.bytes_sent[stage]
        assert traffic.between_stages[device] == figures.bytes_between_stages[stage]
    assert estimate.bytes_per_device == max(traffic.sent)


LAYERS = ("mesh dp=2 pp=4\ndim B=64 S=512 D=1024 F=4096 L=16\ninput x[B@dp, S, D]\n"
          "repeat L@pp {{\n  param w1[D, F]\n  param w2[F, D]\n  h[B,S,F] = gelu(x[B,S,D] * w1[D,F])\n"
          "  x[B,S,D] = x[B,S,D] + h[B,S,F] * w2[F,D]\n}}\nl[] = mean[B,S,D](square(x[B,S,D]))\n"
          "loss l\nmicrobatches B=8\n{schedule}\noptimizer sgd lr=0.1\n")


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_the_bubble_is_the_closed_form_when_transfers_are_free(schedule, monkeypatch):
    """Layers of equal work on every stage, stage-to-stage transfers free: the step's bubble
    is (p − 1)/(m + p − 1), or (p − 1)/(v·m + p − 1) interleaved (Narayanan et al. 2021,
    section 2.2), to within what the steps outside the layers add to some slots (the
    loss, 10^-5 of a stage's work; each micro-batch's gradient accumulation, 2% of a
    chunk's: 0.2 points of bubble with v=2)."""
    import einpar.cost_model.pipeline as pipeline_cost
    from einpar.cost_model.collectives import CollectiveTime
    from einpar.schedule import bubble_formula, in_flight_formula

    monkeypatch.setattr(pipeline_cost, "collective_time",
                        lambda kind, *_: CollectiveTime(kind, 1, "local", 0.0, 0.0, "none", 0.0, 1))
    _, spmd, estimate = priced(LAYERS.format(schedule=SCHEDULES[schedule]))
    p, m, v = 4, 8, spmd.pipeline.schedule.chunks
    figures = estimate.pipeline.to_json()
    assert figures["bubble"] == pytest.approx(bubble_formula(schedule, p, m, v), abs=3e-3)
    assert figures["in_flight"] == list(in_flight_formula(schedule, p, m, v))
    assert estimate.training.time_s["bubble"] > 0


def test_each_schedule_keeps_its_activations_in_flight_per_stage():
    """GPipe keeps all m micro-batches' saved activations on every stage; 1F1B at most
    p − k on stage k: the peaks differ by exactly the difference in micro-batches held
    times one micro-batch's saved activations of the stage's layers."""
    from einpar.layout import local_bytes
    from einpar.pipeline import Body, split_step

    peaks, saved = {}, None
    for schedule in ("gpipe", "1f1b"):
        _, spmd, estimate = priced(LAYERS.format(schedule=SCHEDULES[schedule]))
        peaks[schedule] = estimate.pipeline.stage_peak_bytes
        loop = Body(split_step(spmd.steps, spmd.pipeline)[1], spmd.pipeline.dim).forward
        saved = sum(local_bytes(spmd.values[after].layout, spmd.values[after].type.shape,
                                spmd.values[after].type.dtype, spmd.mesh) for _, after in loop.saved)
    p, m = 4, 8
    assert saved > 0
    for stage in range(p):
        assert peaks["gpipe"][stage] - peaks["1f1b"][stage] == (m - (p - stage)) * saved


def test_cost_trace_has_a_track_per_stage(tmp_path):
    """`einpar cost --trace`: one process per stage with each of its 2·m·v slots, and a
    transfer on the sending stage for every micro-batch crossing a boundary."""
    import json

    from einpar.cli import main

    path = tmp_path / "stack.ein"
    path.write_text(mlp_stack(schedule="interleaved"))
    assert main(["cost", str(path), "--cluster", "a100x8", "--trace", str(tmp_path / "t.json")]) == 0
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert [names[1], names[2]] == ["stage 0", "stage 1"]
    m, v = 4, 2
    for pid in (1, 2):
        slots = [e["name"] for e in events if e.get("pid") == pid and e.get("cat") in ("forward", "backward")]
        assert len(slots) == 2 * m * v and slots[0] == "F0"
    transfers = [e for e in events if e.get("cat") == "communication" and e["name"].startswith("to stage")]
    # forward: every virtual stage but the last sends (p·v − 1 boundaries), backward alike
    assert len(transfers) == 2 * m * (2 * v - 1)


# ---- explain


def test_explain_shows_the_stages_the_schedule_and_where_each_statement_runs(tmp_path, capsys,
                                                                           monkeypatch):
    import json

    from einpar.cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "stack.ein"
    path.write_text(mlp_stack(schedule="interleaved"))
    path = "stack.ein"
    assert main(["explain", str(path), "--width", "100"]) == 0
    shown = capsys.readouterr().out
    assert "one stage of mesh dp=2 pp=2 tp=2 (4 of its 8 devices)" in shown
    assert "  stage 0: trips 0-1, 4-5" in shown and "  stage 1: trips 2-3, 6-7" in shown
    assert "interleaved: 2 stages, 4 micro-batches, v=2; bubble" in shown
    assert "x[B,D] = take[V](emb[V,D], ids[B])  (runs 4 times)  (on stage 0 only)" in shown
    assert main(["explain", str(path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    pipeline = document["pipeline"]
    assert pipeline["stage_trips"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [len(stage) for stage in pipeline["slots"]] == [16, 16]  # 2·m·v per stage
    by_name = {}  # each name's first statement (the embedding's x, not the layers')
    for statement in document["statements"]:
        by_name.setdefault(statement["name"], statement["stages"])
    assert by_name["x"] == [0] and by_name["l"] == [1] and by_name["emb"] == [0]
    assert by_name["w1"] is None  # the layers' params are updated on every stage
    gantt = tmp_path / "schedule.svg"
    assert main(["explain", path, "--gantt", str(gantt)]) == 0
    svg = gantt.read_text()
    assert svg.startswith("<svg") and svg.count("<title>F micro-batch") == 2 * 8
    assert main(["explain", str(path), "--gantt", str(gantt)]) == 2  # not overwritten
    assert "exists; pass --force" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_the_pipeline_examples_compute_what_the_gpt_example_does(schedule):
    """examples/pipeline/gpt_*.ein is examples/training/gpt.ein with its layers over pp and
    its batch in micro-batches: on the same inputs the reference gives the same loss (a
    mean of equal micro-batches' means), updated params and optimizer state."""
    pipelined = ein.load(ROOT / "examples" / "pipeline" / f"gpt_{schedule}.ein")
    sizes = pipelined.forward.dim_sizes
    plain = ein.load(ROOT / "examples" / "training" / "gpt.ein",
                     {"B": sizes["B"], "L": sizes["L"], "tp": 2})
    inputs = ein.random_inputs(pipelined, 0)
    whole = {value.name: inputs[value.name].reshape(value.type.shape) for value in plain.inputs}
    ours, theirs = evaluate(pipelined, inputs), evaluate(plain, whole)
    tolerance = program_tolerance(plain)
    assert set(theirs) <= set(ours)
    for name in theirs:
        found = compare(name, theirs[name], ours[name], tolerance)
        assert found.ok, (name, found.error)


def test_bench_pipeline_prices_gpt3_175b_as_sc21_ran_it():
    """bench/pipeline.py's configuration: GPT-3 175B on 1,024 A100s, tp 8, pp 8, dp 16, 96
    micro-batches, interleaved with 2 chunks: the schedule's table has 2·m·v slots per stage,
    and the bubble is above the closed form (the first and last stages do more: the embedding,
    the head) but within 5 points of it. (Timings are the benchmark's to print.)"""
    import importlib.util

    from einpar.schedule import bubble_formula

    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    program, result = bench.priced("interleaved", 1024)
    figures = result.pipeline.to_json()
    assert (figures["stages"], figures["microbatches"], figures["chunks"]) == (8, 96, 2)
    assert all(len(stage) == 2 * 96 * 2 for stage in result.pipeline.timeline.stages)
    closed = bubble_formula("interleaved", 8, 96, 2)
    assert closed < figures["bubble"] < closed + 0.05
    assert result.devices == 1024 and result.training.time_s["bubble"] > 0


def test_a_schedule_too_long_to_lay_out_is_refused_before_any_work(tmp_path, capsys):
    """2^24 micro-batches on 8 stages: 2^28 slots. `einpar check` answers from arithmetic
    (test_schedule.py); compiling, running or pricing it would lay out every slot, so it is
    refused with E257 at the repeat, before partitioning."""
    from einpar.cli import main
    from einpar.pipeline import MAX_SLOTS

    path = tmp_path / "huge.ein"
    path.write_text("mesh pp=8\ndim B=16777216 D=4 E=4 L=8\ninput x[B, D]\nrepeat L@pp {\n"
                    "  param w[E, D]\n  x[B,D] = x[B,E] * w[E,D]\n}\nl[] = mean[B,D](square(x[B,D]))\n"
                    "loss l\nmicrobatches B=16777216\nschedule 1f1b\n")
    for command in (["compile"], ["cost", "--cluster", "a100x8"], ["run", "--backend", "numpy"]):
        assert main([command[0], str(path), *command[1:]]) == 1
        err = capsys.readouterr().err
        assert (f"error[E257]: the 1f1b schedule of 8 stages and 16,777,216 micro-batches has "
                f"268,435,456 slots, more than einpar lays out ({MAX_SLOTS:,})") in err
        assert "huge.ein:4:1" in err


def test_a_runs_memory_estimate_counts_the_micro_batches_a_pipeline_holds():
    """Refusing a run too big for memory (einpar.resources) counts what a pipeline keeps at
    once: the simulator a stage's micro-batches in flight (GPipe all m, 1F1B at most p + 1),
    the JAX module every micro-batch's."""
    from einpar.resources import estimate_run, held_copies

    runs = {}
    for schedule in ("gpipe", "1f1b"):
        program = ein.compile_source(mlp_stack("pp=4 tp=2", schedule, microbatches=8), file="m.ein")
        spmd = ein.compile_spmd(program)
        runs[schedule] = (held_copies(spmd, "numpy"), held_copies(spmd, "jax"),
                          estimate_run(program, "numpy", spmd).bytes)
    assert runs["gpipe"][:2] == (8, 8) and runs["1f1b"][:2] == (5, 8)
    assert runs["gpipe"][2] > runs["1f1b"][2]
