"""Pipeline schedules (einpar/schedule.py): each is a valid order of every micro-batch's work,
and its timeline reproduces the published closed forms of the bubble and of the activations
in flight."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einpar.gantt import gantt_svg, gantt_text
from einpar.schedule import (BACKWARD, FORWARD, ScheduleError, Slot, bubble_formula,
                             in_flight_formula, make_schedule, timeline)


@st.composite
def configurations(draw):
    name = draw(st.sampled_from(["gpipe", "1f1b", "interleaved"]))
    p = draw(st.integers(1, 8))
    if name == "interleaved":
        v = draw(st.integers(1, 4))
        m = p * draw(st.integers(1, 4))
    else:
        v = 1
        m = draw(st.integers(p if name == "1f1b" else 1, 3 * p + 2))
    return name, p, m, v


@settings(max_examples=150, deadline=None)
@given(configurations())
def test_every_stage_runs_each_of_its_chunks_work_once(config):
    name, p, m, v = config
    schedule = make_schedule(name, p, m, v)
    for slots in schedule.slots:
        expected = {Slot(i, kind, c) for i in range(m) for kind in (FORWARD, BACKWARD)
                    for c in range(v)}
        assert sorted(slots, key=str) == sorted(expected, key=str)
        # A stage runs a micro-batch's backward through a chunk after its forward.
        seen = set()
        for slot in slots:
            if slot.kind == BACKWARD:
                assert (slot.microbatch, slot.chunk) in seen
            seen.add((slot.microbatch, slot.chunk))


@settings(max_examples=150, deadline=None)
@given(configurations(), st.sampled_from([(1.0, 2.0), (1.0, 1.0), (3.0, 5.0)]))
def test_bubble_and_in_flight_match_the_closed_forms(config, times):
    """With uniform stages and free transfers: the bubble is (p-1)/(m+p-1) for gpipe and
    1f1b and (p-1)/(v*m+p-1) interleaved (Narayanan et al. 2021), and each stage's peak
    activations are those its schedule is known to keep (gpipe m, 1f1b p-k, interleaved
    its warm-up plus one)."""
    name, p, m, v = config
    forward, backward = times
    line = timeline(make_schedule(name, p, m, v), forward / v, backward / v)
    assert line.bubble == pytest.approx(bubble_formula(name, p, m, v), abs=1e-12)
    assert line.makespan == pytest.approx((m + (p - 1) / v) * (forward + backward))
    assert line.in_flight() == in_flight_formula(name, p, m, v)


def test_the_textbook_figures():
    # Narayanan et al. 2021, figures 3 and 4: p = 4, m = 8.
    assert bubble_formula("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_formula("interleaved", 4, 8, 2) == pytest.approx(3 / 19)
    assert in_flight_formula("1f1b", 4, 8) == (4, 3, 2, 1)
    assert in_flight_formula("gpipe", 4, 8) == (8, 8, 8, 8)
    one = make_schedule("1f1b", 4, 8)
    assert [str(slot) for slot in one.slots[0]] == \
        ["F0", "F1", "F2", "F3", "B0", "F4", "B1", "F5", "B2", "F6", "B3", "F7", "B4", "B5", "B6", "B7"]
    assert [str(slot) for slot in one.slots[3]][:4] == ["F0", "B0", "F1", "B1"]


def test_transfers_between_stages_delay_the_work_and_are_counted():
    p, m = 4, 8
    line = timeline(make_schedule("1f1b", p, m), 1.0, 2.0, transfer=0.5)
    # One activation forward and one gradient backward per micro-batch per boundary.
    assert len(line.transfers) == 2 * m * (p - 1)
    assert line.makespan > (m + p - 1) * 3.0
    interleaved = timeline(make_schedule("interleaved", p, m, 2), 0.5, 1.0, transfer=0.5)
    # v times the boundaries (each chunk's output goes to the next stage, wrapping around).
    assert len(interleaved.transfers) == 2 * m * (p * 2 - 1)


def test_stage_times_may_differ():
    line = timeline(make_schedule("gpipe", 2, 2), 0, 0,
                    stage_times=lambda stage, chunk: (1.0, 2.0) if stage == 0 else (2.0, 4.0))
    # The slow stage sets the pace: 1 + 2 + 2 forward, 4 + 4 + 2 backward.
    assert line.makespan == pytest.approx(15.0)


@pytest.mark.parametrize("args, message", [
    (("1f1b", 4, 2), "1f1b needs at least as many micro-batches as stages (2 micro-batches for 4 stages)"),
    (("interleaved", 4, 6, 2), "the interleaved schedule needs a multiple of the 4 stages as "
                               "micro-batches (6 micro-batches)"),
    (("gpipe", 4, 8, 2), "only the interleaved schedule has several chunks per stage (v=2 with gpipe)"),
    (("zero", 4, 8), "unknown schedule 'zero' (one of gpipe, 1f1b, interleaved)"),
    (("gpipe", 0, 8), "stages, micro-batches and chunks must be at least 1"),
])
def test_schedules_that_cannot_be_built_say_why(args, message):
    with pytest.raises(ScheduleError) as error:
        make_schedule(*args)
    assert str(error.value) == message


def test_an_order_that_deadlocks_is_refused():
    from einpar.schedule import Schedule
    # Stage 0 starts with micro-batch 0's backward, which waits for stage 1's backward, which
    # waits for the forward stage 0 has not run.
    bad = Schedule("custom", 2, 1, 1, ((Slot(0, BACKWARD), Slot(0, FORWARD)),
                                       (Slot(0, FORWARD), Slot(0, BACKWARD))))
    with pytest.raises(ScheduleError, match="deadlocks"):
        timeline(bad, 1.0, 2.0)


def test_the_gantt_chart_shows_every_slot_and_the_bubble():
    line = timeline(make_schedule("1f1b", 4, 8), 1.0, 2.0)
    svg = gantt_svg(line, title="<1f1b & friends>")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<title>") == 4 * 16
    assert "&lt;1f1b &amp; friends&gt;" in svg  # a title is text, never markup
    text = gantt_text(line, width=66)
    assert text.splitlines()[0] == "1f1b: 4 stages, 8 micro-batches; bubble 27.3%"
    assert text.splitlines()[1].startswith("stage 0  │0─1─2─3─············0═══4─1═══")


def test_the_charts_in_the_docs_are_what_gantt_text_draws():
    from pathlib import Path
    page = (Path(__file__).resolve().parent.parent / "docs" / "pipeline.md").read_text()
    charts = [block for block in page.split("```\n") if block.startswith(("gpipe:", "1f1b:", "interleaved:"))]
    drawn = [gantt_text(timeline(make_schedule(name, 4, 8, v), 1 / v, 2 / v), width).rstrip("\n")
             for name, v, width in (("gpipe", 1, 66), ("1f1b", 1, 66), ("interleaved", 2, 114))]
    assert [chart.rstrip("\n") for chart in charts] == drawn


def test_check_shows_the_stages_and_the_schedule(tmp_path, capsys):
    import json

    from einpar.cli import main
    text = ("mesh pp=4\ndim B=8 D=4 E=4 L=8\ninput x[B, D]\nrepeat L@pp {\n  param w[E, D]\n"
            "  x[B,D] = x[B,E] * w[E,D]\n}\nl[] = mean[B,D](square(x[B,D]))\nloss l\n"
            "microbatches B=8\nschedule interleaved v=2\n")
    (tmp_path / "p.ein").write_text(text)
    assert main(["check", str(tmp_path / "p.ein"), "--json"]) == 0
    pipeline = json.loads(capsys.readouterr().out)["pipeline"]
    assert pipeline["trips"] == [[[0, 0], [4, 4]], [[1, 1], [5, 5]], [[2, 2], [6, 6]], [[3, 3], [7, 7]]]
    assert (pipeline["schedule"], pipeline["chunks"], pipeline["microbatches"]) == ("interleaved", 2, 8)
    assert pipeline["bubble"] == pytest.approx(bubble_formula("interleaved", 4, 8, 2))
    assert pipeline["in_flight"] == list(in_flight_formula("interleaved", 4, 8, 2))
    (tmp_path / "f.ein").write_text(text.split("l[]")[0] + "output x\n")  # forward only
    assert main(["check", str(tmp_path / "f.ein"), "--json"]) == 0
    forward = json.loads(capsys.readouterr().out)["pipeline"]
    assert (forward["schedule"], forward["in_flight"]) == ("forward", None)
    assert forward["bubble"] == pytest.approx(3 / 4)


def test_check_of_a_pipeline_of_millions_of_micro_batches_builds_no_schedule(tmp_path, capsys):
    """The checker and `check` answer from arithmetic and closed forms: a schedule of 2^24
    micro-batches on 8 stages (2^28 slots) is never built."""
    import json

    from einpar.cli import main
    (tmp_path / "p.ein").write_text(
        "mesh pp=8\ndim B=16777216 D=4 E=4 L=8\ninput x[B, D]\nrepeat L@pp {\n  param w[E, D]\n"
        "  x[B,D] = x[B,E] * w[E,D]\n}\nl[] = mean[B,D](square(x[B,D]))\nloss l\n"
        "microbatches B=16777216\nschedule 1f1b\n")
    assert main(["check", str(tmp_path / "p.ein"), "--json"]) == 0
    pipeline = json.loads(capsys.readouterr().out)["pipeline"]
    assert pipeline["bubble"] == pytest.approx(7 / (2 ** 24 + 7))
    assert pipeline["in_flight"] == [8, 7, 6, 5, 4, 3, 2, 1]
