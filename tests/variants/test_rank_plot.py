"""The rank heat map (lorafactory/results/ranks.py): the grid it lays out, and the file it draws from a record."""

from __future__ import annotations

import math

import pytest

from lorafactory.results.ranks import OUTSIDE, plot_ranks, plot_record_ranks, rank_grid, split_name
from lorafactory.results.record import RunRecord

BERT = {
    "bert.encoder.layer.10.attention.self.query": 3,
    "bert.encoder.layer.2.attention.self.query": 7,
    "bert.encoder.layer.2.output.dense": 1,
    "bert.encoder.layer.10.output.dense": 0,
    "bert.pooler.dense": 5,
}


def test_names_split_into_layer_and_module():
    assert split_name("model.layers.12.self_attn.q_proj") == ("12", "self_attn.q_proj")
    assert split_name("bert.pooler.dense") == (OUTSIDE, "bert.pooler.dense")
    assert split_name("stem") == (OUTSIDE, "stem")


def test_grid_puts_each_rank_in_its_layer_row_and_module_column():
    layers, modules, grid = rank_grid(BERT)
    assert layers == ["2", "10", OUTSIDE]  # numeric order, not "10" < "2"
    assert modules == ["attention.self.query", "output.dense", "bert.pooler.dense"]
    assert grid[0].tolist()[:2] == [7, 1] and grid[1].tolist()[:2] == [3, 0]
    assert grid[2, 2] == 5
    assert math.isnan(grid[0, 2]) and math.isnan(grid[2, 0])  # no pooler in layer 2, no query outside the layers


def test_a_record_draws_a_png(tmp_path):
    record = RunRecord(
        status="ok", model="tiny-bert", task="glue/sst2", variant="adalora", seed=0, lr=1e-3,
        variant_summary={"ranks": BERT},
    )  # fmt: skip
    path = plot_record_ranks(record, tmp_path / "figs" / "ranks.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 2000
    assert plot_ranks({"stem": 4, "expand": 2}, tmp_path / "cnn.png").exists()  # a CNN: one row, outside layers


def test_a_record_without_ranks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no variant_summary"):
        plot_record_ranks({"variant": "lora", "variant_summary": {}}, tmp_path / "x.png")
