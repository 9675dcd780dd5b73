"""Results side by side: the accuracies of several methods (and seeds) as one table.

:func:`results_table` takes rows ``{"method": name, metric: value or [per-seed values]}``
(the values plain accuracies or :mod:`swav_ref.evaluate`'s result objects), and gives the
mean and the standard deviation over seeds of each metric; :func:`format_results` prints it
with the notes a reader needs (a kNN's k clipped to a small train split, a probe that did
not converge); :func:`save_results_json` keeps it, with the per-seed values, the probe's
choices and the machine::

    row = {"method": "SwAV", **evaluate_features(f_train, y_train, f_test, y_test)}
    print(format_results(results_table([raw_row, random_row, row])))
"""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from swav_ref.checkpoint import write_atomically
from swav_ref.evaluate import METRICS, KNNResult, LinearProbeResult

__all__ = ["format_results", "machine_description", "results_table", "save_results_json"]

#: Rows of a results table: a list of ``{"method": name, metric: value, ...}``, or one dict
#: ``{method: {metric: value, ...}}``.
Rows = Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]


def _as_values(value: Any) -> list[float]:
    """One accuracy or a list of per-seed accuracies (floats or result objects) as floats."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        return [float(v) for v in value]
    return [float(value)]


def _collect(rows: Rows):
    """``{method: {metric: [per-seed values]}}`` and the metric names in display order."""
    if isinstance(rows, Mapping):
        rows = [{"method": method, **metrics} for method, metrics in rows.items()]
    collected: dict[str, dict[str, list[float]]] = {}
    seen: list[str] = []
    for row in rows:
        if "method" not in row:
            raise ValueError(f"each row needs a 'method' key, got keys {sorted(row)}")
        method = str(row["method"])
        if method in collected:
            raise ValueError(f"method {method!r} appears twice; give per-seed values as a list")
        collected[method] = {}
        for metric, value in row.items():
            if metric == "method":
                continue
            collected[method][metric] = _as_values(value)
            if metric not in seen:
                seen.append(metric)
    metrics = [m for m in METRICS if m in seen] + [m for m in seen if m not in METRICS]
    return collected, metrics


def _knn_k_used(rows: Rows) -> dict[str, list[int]]:
    """``{metric: [every k actually used]}`` for the kNN metrics whose k was clipped to the
    size of a train split in some row (or seed); only :class:`~swav_ref.evaluate.KNNResult` values say so."""
    if isinstance(rows, Mapping):
        rows = list(rows.values())
    used: dict[str, set[int]] = {}
    clipped: set[str] = set()
    for row in rows:
        for metric, value in row.items():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, KNNResult):
                    used.setdefault(metric, set()).add(v.k)
                    if v.clipped:
                        clipped.add(metric)
    return {metric: sorted(used[metric]) for metric in used if metric in clipped}


def _probe_summaries(rows: Rows) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{method: {metric: [per-seed LinearProbeResult.summary()]}}`` for the values that
    are probe results (plain floats carry no choices, so they are left out)."""
    if isinstance(rows, Mapping):
        rows = [{"method": method, **metrics} for method, metrics in rows.items()]
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        for metric, value in row.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            summaries = [v.summary() for v in values if isinstance(v, LinearProbeResult)]
            if summaries:
                found.setdefault(str(row["method"]), {})[metric] = summaries
    return found


def results_table(rows: Rows) -> pd.DataFrame:
    """One row per method, the mean (and std over seeds) of each metric.

    Parameters
    ----------
    rows
        a list of dicts ``{"method": name, metric: value, ...}`` or a dict
        ``{name: {metric: value}}``. A value is an accuracy in [0, 1] (a float, or a
        :class:`~swav_ref.evaluate.LinearProbeResult` / :class:`~swav_ref.evaluate.KNNResult`)
        or a list of them, one per seed.

    Returns
    -------
    pandas.DataFrame
        indexed by method, with columns ``seeds`` and, for each metric (the standard
        :data:`~swav_ref.evaluate.METRICS` first), ``<metric>`` (the mean) and ``<metric> std`` (the sample
        standard deviation over seeds, ddof=1; NaN for a single seed). Missing values are NaN.
        ``df.attrs["k_used"]`` is ``{metric: [k, ...]}`` for each kNN column whose k was
        clipped to the size of a small train split (say, "kNN k=200" computed with k=72),
        listing every k actually used; it is empty when nothing was clipped or the values
        are plain floats, which do not know their k. ``df.attrs["not_converged"]`` lists
        the ``(method, metric)`` pairs where a linear probe's final fit did not converge.
    """
    if not isinstance(rows, Mapping):
        rows = list(rows)  # read twice below
    collected, metrics = _collect(rows)
    records = []
    for method, values in collected.items():
        record: dict[str, Any] = {"method": method}
        record["seeds"] = max((len(v) for v in values.values()), default=0)
        for metric in metrics:
            v = values.get(metric, [])
            record[metric] = float(np.mean(v)) if v else math.nan
            record[f"{metric} std"] = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
        records.append(record)
    columns = ["seeds"] + [c for m in metrics for c in (m, f"{m} std")]
    table = pd.DataFrame.from_records(records, index="method", columns=["method"] + columns)
    table.attrs["k_used"] = _knn_k_used(rows)
    table.attrs["not_converged"] = [
        (method, metric)
        for method, by_metric in _probe_summaries(rows).items()
        for metric, summaries in by_metric.items()
        if not all(s["converged"] for s in summaries)
    ]
    return table


def format_results(df: pd.DataFrame, *, decimals: int = 1) -> str:
    """The table as text, accuracies in percent: ``93.1 ± 0.4`` over seeds, ``93.1`` for one.

    A ``seeds`` column is shown when any method has more than one seed; missing values
    print as ``-``. A kNN column whose k was clipped (``df.attrs["k_used"]``) says so in its
    header, e.g. ``kNN k=200 (k=72 used)``. A probe that did not converge
    (``df.attrs["not_converged"]``) is marked ``*`` and explained below the table.
    """
    k_used = df.attrs.get("k_used", {})
    not_converged = {tuple(pair) for pair in df.attrs.get("not_converged", [])}
    metrics = [c for c in df.columns if c != "seeds" and not c.endswith(" std")]
    shown = pd.DataFrame(index=df.index)
    if "seeds" in df.columns and (df["seeds"] > 1).any():
        shown["seeds"] = df["seeds"].astype(int)
    for metric in metrics:
        std_column = df.get(f"{metric} std")
        cells = []
        for method in df.index:
            mean = df.at[method, metric]
            std = math.nan if std_column is None else std_column[method]
            if math.isnan(mean):
                cells.append("-")
            elif math.isnan(std):
                cells.append(f"{100 * mean:.{decimals}f}")
            else:
                cells.append(f"{100 * mean:.{decimals}f} ± {100 * std:.{decimals}f}")
            if (method, metric) in not_converged:
                cells[-1] += " *"
        header = metric
        if metric in k_used:
            header += f" (k={'/'.join(str(k) for k in k_used[metric])} used)"
        shown[header] = cells
    shown.index.name = None
    text = shown.to_string()
    if not_converged:
        text += ("\n* the linear probe's L-BFGS did not converge in its iteration limit: the accuracy "
                 "may be low; raise max_iter in linear_probe")
    return text


def machine_description() -> str:
    """The machine results were measured on, for a results file: ``"x86_64, 2 cores"``."""
    import platform

    return f"{platform.machine() or 'unknown'}, {os.cpu_count()} cores"


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def save_results_json(
    path: str | os.PathLike,
    rows: Rows,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the per-seed values and their mean and std to ``path`` as JSON (atomically).

    The file holds ``{"metrics": [...], "results": [{"method", "seeds", <metric>: {"mean",
    "std", "values"}}], "metadata": {...}}``; NaN (a missing value, or the std of one seed)
    is written as ``null``. A linear probe's metric also keeps ``"probe"``, its choices for
    each seed (:meth:`~swav_ref.evaluate.LinearProbeResult.summary`: C, the folds, convergence). ``metadata``
    must be JSON-serialisable (dataset, backend, seed...); ``date`` (today, ISO) and
    ``machine`` (``"x86_64, 2 cores"``: the processor and its cores) are added unless it has them.
    """
    if not isinstance(rows, Mapping):
        rows = list(rows)  # read twice below
    collected, metrics = _collect(rows)
    table = results_table(rows)
    probes = _probe_summaries(rows)
    results = []
    for method, values in collected.items():
        entry: dict[str, Any] = {"method": method, "seeds": int(table.at[method, "seeds"])}
        for metric in metrics:
            entry[metric] = {
                "mean": _json_number(table.at[method, metric]),
                "std": _json_number(table.at[method, f"{metric} std"]),
                "values": values.get(metric, []),
            }
            if metric in probes.get(method, {}):
                entry[metric]["probe"] = probes[method][metric]
        results.append(entry)
    metadata = {"date": datetime.date.today().isoformat(), "machine": machine_description(),
                **(metadata or {})}
    payload = {"metrics": metrics, "results": results, "metadata": metadata}
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"  # (a ValueError here writes nothing)
    return write_atomically(path, lambda f: f.write(text), mode="w")  # never a half-written file
