from __future__ import annotations

import logging
import math

import pytest
import torch

from medistill.errors import UsageError
from medistill.models.tabular import TableSchema, TabularMLP, single_column_auroc, warn_on_leaky_columns

ROWS = [
    {"density": 2, "shape": "ROUND", "margin": "CIRCUMSCRIBED", "assessment": 2},
    {"density": 3, "shape": "IRREGULAR", "margin": "SPICULATED", "assessment": 5},
    {"density": None, "shape": "OVAL", "margin": None, "assessment": 3},
    {"density": 1, "shape": "IRREGULAR", "margin": "ILL_DEFINED", "assessment": 4},
]


def test_schema_infers_types_and_encodes_missing_values():
    schema = TableSchema.fit(ROWS)
    assert set(schema.numeric) == {"density", "assessment"}
    assert set(schema.categorical) == {"shape", "margin"}
    encoded = schema.encode(ROWS + [{"shape": "LOBULATED"}])
    assert encoded["categories"].shape == (5, 2) and encoded["numbers"].shape == (5, 2)
    columns = schema.columns
    assert encoded["missing"][2, columns.index("density")] == 1 and encoded["missing"][2, columns.index("margin")] == 1
    assert encoded["categories"][4, list(schema.categorical).index("shape")] == 1  # unseen value
    assert encoded["missing"][4].sum() == 3  # margin, density, assessment absent
    assert torch.allclose(encoded["numbers"][:4, list(schema.numeric).index("assessment")].mean(), torch.tensor(0.0))
    assert TableSchema.from_dict(schema.to_dict()) == schema


def test_unknown_column_is_refused():
    with pytest.raises(UsageError, match=r"\['age'\] were not seen"):
        TableSchema.fit(ROWS).encode([{"age": 50}])


def test_mlp_runs_on_encoded_rows():
    schema = TableSchema.fit(ROWS)
    out = TabularMLP(schema, 2)(**schema.encode(ROWS))
    assert out["logits"].shape == (4, 2) and out["embedding"].shape[0] == 4


def test_leaky_column_is_flagged(caplog):
    rows = [{"assessment": a, "noise": n} for a, n in zip([2, 3, 4, 5, 2, 5, 4, 3], "abababab")]
    labels = [0, 0, 1, 1, 0, 1, 1, 0]
    scores = single_column_auroc(rows, labels)
    assert scores["assessment"] == 1.0 and scores["noise"] == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING):
        assert warn_on_leaky_columns(rows, labels) == ["assessment"]
    assert "assessment" in caplog.text
    assert single_column_auroc(rows, [math.nan] * 8) == {}
