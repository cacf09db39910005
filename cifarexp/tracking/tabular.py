"""Tables as they are stored (CSV artifacts, MLflow tables): numbers as numbers, rounded once.

Every number keeps 6 significant digits, and never fewer than its integer digits (a count of
11,173,962 stays whole); both the CSV and the MLflow table hold the same rounded values, so
a figure reads the same wherever it is opened. Formatting for a reader (thousands
separators, 2 decimals) happens only when a table is shown (`analysis.folder.format_value`).
"""

from __future__ import annotations

import math
import numbers

import pandas as pd

DIGITS = 6  # significant digits kept


def round_number(value: object) -> object:
    """`value` rounded to DIGITS significant digits (integer digits all kept) if it is a finite
    float; anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if isinstance(value, numbers.Integral) or not math.isfinite(value) or value == 0:
        return value
    integer_digits = math.floor(math.log10(abs(value))) + 1
    return round(float(value), max(0, DIGITS - integer_digits))


def rounded(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with its floats rounded by `round_number` (numeric columns keep their dtype)."""
    out = table.copy()
    for column in out.columns:
        series = out[column]
        if pd.api.types.is_float_dtype(series):
            out[column] = series.map(round_number)
        elif series.dtype == object:  # counts beside decimals: each keeps its type
            values = [round_number(v) for v in series]
            out[column] = pd.Series(values, index=series.index, dtype=object)
    return out


def csv_text(table: pd.DataFrame) -> str:
    """`table` as CSV: its numbers rounded once, written in full (no exponent for a count)."""
    return rounded(table).to_csv(index=False, float_format="%.15g")
