"""Cells of the method-comparison benchmark: keys and presets."""

import pytest

from benchmarks.compare.grid import ORANGE, PEERS, Cell, DataSpec, full_grid, quick_grid

SVI = (("max_steps", 100), ("lr", 0.02))


def test_key_is_stable_across_processes_and_releases():
    # Pinned: a change of this value silently orphans every stored result.
    assert Cell("svi-normal", ORANGE, 0, SVI, 60).key == "a45eb8d047c076ad"


def test_key_ignores_settings_order_and_the_time_limit():
    reference = Cell("svi-normal", ORANGE, 0, SVI, 60)
    assert Cell("svi-normal", ORANGE, 0, SVI[::-1], 60).key == reference.key
    assert Cell("svi-normal", ORANGE, 0, SVI, 9999).key == reference.key


@pytest.mark.parametrize(
    "other",
    [
        Cell("svi-lowrank", ORANGE, 0, SVI),
        Cell("svi-normal", DataSpec("soybean"), 0, SVI),
        Cell("svi-normal", ORANGE, 1, SVI),
        Cell("svi-normal", ORANGE, 0, (("max_steps", 101), ("lr", 0.02))),
        Cell("svi-normal", ORANGE, 0, (("max_steps", 100),)),
    ],
)
def test_key_changes_with_engine_data_seed_and_settings(other):
    assert other.key != Cell("svi-normal", ORANGE, 0, SVI).key


def test_design_size_and_marker_form_change_the_key():
    small = DataSpec("design", n_varieties=30, n_markers=2000)
    assert Cell("nuts", small).key != Cell("nuts", DataSpec("design", 31, 0, 2000)).key
    effects = DataSpec("design", n_varieties=30, n_markers=2000, marker_form="effects")
    assert Cell("nuts", small).key != Cell("nuts", effects).key


def test_json_round_trip_keeps_the_key():
    cell = Cell("saem", ORANGE, 2, (("iterations", [10, 5]),), 30)
    again = Cell.from_json(cell.to_json())
    assert again.key == cell.key and again.time_limit_s == 30


def test_unknown_engine_or_data_set_is_named():
    with pytest.raises(ValueError, match="unknown engine 'svi'"):
        Cell("svi", ORANGE)
    with pytest.raises(ValueError, match="unknown data set 'apple'"):
        DataSpec("apple")


def test_quick_preset_has_the_required_engines_and_a_peer():
    engines = {c.engine for c in quick_grid()}
    assert {"svi-normal", "svi-amortized", "saem", "nuts"} <= engines
    assert engines & set(PEERS)
    assert {c.seed for c in quick_grid()} == {0}


def test_full_preset_runs_nuts_at_full_size_in_kinship_form_only():
    full = [c for c in full_grid((0,)) if c.data.size == "full"]
    nuts = [c for c in full if c.engine == "nuts"]
    assert nuts and all(c.data.marker_form == "kinship" for c in nuts)
    assert len({c.key for c in full_grid()}) == len(full_grid())  # no duplicate cells


def test_point_estimate_rows_get_our_flat_labels_whatever_their_format():
    from benchmarks.compare.engines import flat_point_labels

    saem = ["scenario_mean[0,log_rate]", "scenario_mean[1,log_rate]", "genetic_sd[log_rate]"]
    assert flat_point_labels(saem + ["noise_sd"]) == [
        "scenario_mean[0]",
        "scenario_mean[1]",
        "genetic_sd[0]",
        "noise_sd",
    ]
