"""The published training runs in bench/published/training load, are complete enough to
compare against, and split into two non-empty halves."""

import importlib.util
import math
from pathlib import Path

import pytest

from einpar.cost_model.cluster import preset

LOAD_PY = Path(__file__).resolve().parent.parent / "bench" / "published" / "load.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("published_load", LOAD_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load = _load_module()
ROWS = load.training_rows()


def _label(row):
    return f"{row['file']}:{row['model']}@{row['gpus']}"


def test_every_file_has_rows_and_its_header_lines():
    files = sorted((LOAD_PY.parent / "training").glob("*.csv"))
    assert files
    assert {row["file"] for row in ROWS} == {path.name for path in files}
    for path in files:
        heads = [line.split(":", 1)[0] for line in path.read_text().splitlines()[:3]]
        assert heads == ["# source", "# system", "# notes"], path.name


@pytest.mark.parametrize("row", ROWS, ids=_label)
def test_row_has_a_source_and_a_measurement(row):
    assert row["source"].strip()
    assert row["gpus"] and row["gpus"] > 0
    assert row["model"]
    assert row["iteration_s"] is not None or row["tflops_per_gpu"] is not None
    for key in ("iteration_s", "tflops_per_gpu"):
        assert row[key] is None or (math.isfinite(row[key]) and row[key] > 0)
    assert row["mfu"] is None or 0 < row["mfu"] <= 100  # percent, as printed
    assert row["recompute"] in ("none", "selective", "full", "")
    assert row["half"] in ("fit", "held_out")


@pytest.mark.parametrize("row", [r for r in ROWS if None not in (r["tp"], r["pp"], r["dp"])], ids=_label)
def test_parallel_degrees_multiply_to_the_gpu_count(row):
    if row["degrees_mismatch"]:
        pytest.skip("the source's degrees do not multiply to its GPU count (listed in the file's notes)")
    assert row["tp"] * row["pp"] * row["dp"] * (row["cp"] or 1) == row["gpus"]


@pytest.mark.parametrize("row", [r for r in ROWS if r["dp"] is None and None not in (r["tp"], r["pp"])],
                         ids=_label)
def test_model_parallel_degrees_divide_the_gpu_count_where_dp_is_unpublished(row):
    if row["degrees_mismatch"]:
        pytest.skip("listed in the file's notes as a degrees mismatch")
    assert row["gpus"] % (row["tp"] * row["pp"] * (row["cp"] or 1)) == 0


@pytest.mark.parametrize("row", [r for r in ROWS if r["preset"]], ids=_label)
def test_preset_names_a_cluster_of_the_row_gpu_count(row):
    assert preset(row["preset"]).num_devices == row["gpus"]


def test_fit_and_held_out_halves_are_both_non_empty():
    halves = {row["half"] for row in ROWS}
    assert halves == {"fit", "held_out"}
    for name in {row["file"] for row in ROWS}:
        in_file = [row for row in ROWS if row["file"] == name]
        if len(in_file) > 1:
            assert {row["half"] for row in in_file} == {"fit", "held_out"}, name


def test_split_alternates_configurations_within_a_file():
    """The (gpus, model) configurations of a file, sorted, alternate fit and held_out, each
    wholly in one half (a run measured with two recomputations is fitted or judged, not both)."""
    for name in {row["file"] for row in ROWS}:
        in_file = [row for row in ROWS if row["file"] == name]
        configs = sorted({(row["gpus"], row["model"]) for row in in_file})
        for row in in_file:
            position = configs.index((row["gpus"], row["model"]))
            assert row["half"] == ("fit" if position % 2 == 0 else "held_out"), name


def test_a_row_listed_as_a_degrees_mismatch_is_flagged_and_kept(tmp_path):
    header = ",".join(load.TRAINING_COLUMNS)
    (tmp_path / "t.csv").write_text(
        "# source: test\n# system: test\n"
        "# notes: the source prints dp 2 for 8 GPUs at tp 2, pp 1; degrees-mismatch(M1@8)\n"
        f"{header}\n"
        "sys,,8,M1,,,,,,,2,1,2,,,,,,full,,,1.5,,,a source\n"
        "sys,,16,M2,,,,,,,2,1,8,,,,,,,true,,,120,40,another source\n")
    rows = load.training_rows(tmp_path)
    assert [(row["model"], row["degrees_mismatch"], row["half"]) for row in rows] == [
        ("M1", True, "fit"), ("M2", False, "held_out")]
    assert rows[0]["iteration_s"] == 1.5 and rows[0]["tflops_per_gpu"] is None
    assert rows[1]["sequence_parallel"] is True and rows[1]["mfu"] == 40.0


def test_an_unknown_recompute_value_is_refused(tmp_path):
    header = ",".join(load.TRAINING_COLUMNS)
    (tmp_path / "t.csv").write_text(
        f"# source: s\n# system: s\n# notes: n\n{header}\n"
        "sys,,8,M1,,,,,,,,,,,,,,,partial,,,1.0,,,src\n")
    with pytest.raises(ValueError, match="unknown recompute 'partial'"):
        load.training_rows(tmp_path)
