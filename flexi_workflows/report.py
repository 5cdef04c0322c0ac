"""Turn a finished sweep into the numbers a paper table needs: means, stds and 95 % intervals over seeds.

A sweep records one JSON file per trial, and each trial's summary repeats results it shares with other
trials (the base model, a LoRA-8 baseline that does not depend on the router's σ). Averaging those rows
naively would count one result several times and report a spread that is not there, so this module:

1. groups rows by method, dataset and every varied setting except the seed (the seed is averaged over),
2. counts each eval fingerprint once per group (a shared result is one result),
3. merges groups of one method whose results are identical (a setting they ignore becomes null).

`build_report` writes `<sweep_dir>/report/` (report.json, table.md, table.csv and three PNGs) and
returns the report dict; `format_table` renders the Markdown table the CLI prints. The plots live in
`report_plots.py`, so this file stays about aggregation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError

REPORT_DIR = "report"
SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
NOISE_KEY = "router.noise_std"
RANKS_KEY = "method.ranks"

# Two-sided 95 % Student t quantiles t_{0.975, df} for df = 1..30; beyond 30 the normal 1.96 is used.
T_975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042,
}

# Output-row keys that a varied setting's column must not overwrite.
_RESERVED = {"method", "ranks", "dataset", "note", "seeds", "rank_shares", "trial_ids"}


# ----------------------------------------------------------------------------------------- reading


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}") from None


def load_sweep(sweep_dir: str | Path) -> tuple[dict, list[dict]]:
    """sweep.json and every trial record, in file-name order."""
    sweep_dir = Path(sweep_dir)
    sweep = _read_json(sweep_dir / SWEEP_FILE, "sweep description")
    if not isinstance(sweep, dict):
        raise ConfigError(f"sweep description {sweep_dir / SWEEP_FILE} must be a JSON object")
    trial_files = sorted((sweep_dir / TRIALS_DIR).glob("*.json"))
    if not trial_files:
        raise ConfigError(f"no trial records (*.json) in {sweep_dir / TRIALS_DIR}")
    trials = []
    for path in trial_files:
        trial = _read_json(path, "trial record")
        if not isinstance(trial, dict):
            raise ConfigError(f"trial record {path} must be a JSON object")
        trial.setdefault("trial_id", path.stem)
        trials.append(trial)
    return sweep, trials


# ------------------------------------------------------------------------------------- small helpers


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not math.isnan(value)


def _hashable(value: Any) -> str:
    """A stable key for a setting value (lists and dicts are not hashable as they come)."""
    return json.dumps(value, sort_keys=True)


def _is_seed(key: str) -> bool:
    return key.split(".")[-1] == "seed"


def setting_columns(varied: list[str]) -> dict[str, str]:
    """Varied key -> output column name, for the settings that tell groups apart (not seed, not ranks).

    The column is the key's last dotted component (`router.noise_std` -> `noise_std`), or the full key
    when two keys share that component, or `setting.<key>` when it would clash with a fixed row key
    (a sweep over whole methods varies `method`).
    """
    keys = [k for k in varied if not _is_seed(k) and k != RANKS_KEY]
    last = [k.split(".")[-1] for k in keys]
    columns = {}
    for key, name in zip(keys, last):
        column = key if last.count(name) > 1 or name in _RESERVED else name
        columns[key] = f"setting.{key}" if column in _RESERVED else column
    return columns


def format_value(value: Any) -> str:
    """A setting value as it appears in a column label: `0.1`, `adamw`, `[2,8]`."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _sortable(value: Any) -> tuple:
    """None first, then numbers by value, then anything else by its text."""
    if value is None:
        return (0, 0.0, "")
    if _is_number(value):
        return (1, float(value), "")
    return (2, 0.0, format_value(value))


def t_quantile(df: int) -> float:
    return T_975.get(df, 1.96)


# ----------------------------------------------------------------------------------------- grouping


def _split_trials(trials: list[dict]) -> tuple[list[dict], list[dict]]:
    """Finished trials with a summary, and the rest described as {trial_id, status, error}."""
    finished, failed = [], []
    for trial in trials:
        status = trial.get("status")
        rows = (trial.get("summary") or {}).get("rows")
        if status == "FINISHED" and rows:
            finished.append(trial)
            continue
        error = trial.get("error")
        if not error:
            error = "finished without a summary" if status == "FINISHED" else f"status {status}"
        failed.append({"trial_id": trial["trial_id"], "status": status, "error": error})
    return finished, failed


def _group_rows(finished: list[dict], columns: dict[str, str]) -> dict[tuple, dict]:
    """Rows grouped by (method, dataset, settings); inside a group each fingerprint is kept once."""
    groups: dict[tuple, dict] = {}
    for trial in finished:
        overrides = trial.get("overrides") or {}
        settings = {name: overrides.get(key) for key, name in columns.items()}
        settings_key = tuple(_hashable(settings[name]) for name in columns.values())
        for index, row in enumerate(trial["summary"]["rows"]):
            if not isinstance(row, dict) or "method" not in row or "dataset" not in row:
                raise ConfigError(f"trial {trial['trial_id']}: summary row {index} has no method or dataset")
            key = (row["method"], row["dataset"], settings_key)
            group = groups.setdefault(key, {"method": row["method"], "dataset": row["dataset"],
                                            "ranks": row.get("ranks"), "settings": settings,
                                            "results": {}, "trial_ids": set()})
            # A row without a fingerprint cannot be recognised as shared, so it counts on its own.
            fp = row.get("fingerprint") or f"{trial['trial_id']}#{index}"
            group["results"].setdefault(fp, row)
            group["trial_ids"].add(trial["trial_id"])
    return groups


def _merge_into(kept: dict, group: dict) -> None:
    """Fold `group` into `kept`; a setting the two disagree on did not change the result, so it becomes None."""
    for name, value in group["settings"].items():
        if kept["settings"][name] is not None and _hashable(kept["settings"][name]) != _hashable(value):
            kept["settings"][name] = None
    for fp, row in group["results"].items():
        kept["results"].setdefault(fp, row)
    kept["trial_ids"] |= group["trial_ids"]


def _collapse(groups: dict[tuple, dict]) -> list[dict]:
    """Merge groups of one method and dataset that share results.

    Groups with identical fingerprint sets are the same results (LoRA-8 under every router σ). Groups
    that merely overlap are merged too: a shared fingerprint proves the eval did not depend on the
    setting that differs, and one group only misses results because a trial failed; keeping them
    apart would show the same baseline twice with different seed counts.
    """
    merged: list[dict] = []
    for group in groups.values():
        copy = {**group, "settings": dict(group["settings"]), "results": dict(group["results"]),
                "trial_ids": set(group["trial_ids"])}
        overlapping = [m for m in merged if (m["method"], m["dataset"]) == (group["method"], group["dataset"])
                       and m["results"].keys() & group["results"].keys()]
        for other in overlapping:
            merged.remove(other)
            _merge_into(copy, other)
        merged.append(copy)
    return merged


def _numeric_columns(finished: list[dict]) -> list[str]:
    """Every row key that holds a number in some row, in first-seen order."""
    names: list[str] = []
    for trial in finished:
        for row in trial["summary"]["rows"]:
            for key, value in row.items():
                if _is_number(value) and key not in names:
                    names.append(key)
    return names


def _mean_shares(results: list[dict]) -> dict[str, float] | None:
    """Mean routed-rank shares over results; a rank a result never used counts as share 0."""
    shares = [r["rank_shares"] for r in results if isinstance(r.get("rank_shares"), dict)]
    if not shares:
        return None
    ranks = sorted({str(k) for s in shares for k in s}, key=_rank_order)
    return {k: statistics.fmean(float(s.get(k) or 0.0) for s in shares) for k in ranks}


def _rank_order(rank: str) -> tuple:
    """Ranks as numbers ("2" before "16"); anything that is not a number after them, by its text."""
    return (0, int(rank), "") if rank.isdigit() else (1, 0, rank)


def _output_row(group: dict, numeric: list[str], ci_column: str) -> dict:
    results = list(group["results"].values())
    row: dict[str, Any] = {"method": group["method"], "ranks": group["ranks"], "dataset": group["dataset"],
                           "seeds": len(results)}
    row.update(group["settings"])
    for col in numeric:
        values = [float(r[col]) for r in results if _is_number(r.get(col))]
        mean = statistics.fmean(values) if values else None
        if len(values) >= 2:
            std = statistics.stdev(values)
        else:
            std = 0.0 if values else None
        row[f"{col}_mean"] = mean
        row[f"{col}_std"] = std
        if col == ci_column:
            low = high = None
            if len(values) >= 2:
                half = t_quantile(len(values) - 1) * std / math.sqrt(len(values))
                low, high = mean - half, mean + half
            row[f"{col}_ci95_low"] = low
            row[f"{col}_ci95_high"] = high
    row["rank_shares"] = _mean_shares(results)
    row["trial_ids"] = sorted(group["trial_ids"])
    # which copy / split the dataset is, where that is not the paper's (pipeline.summary_rows)
    row["note"] = next((r["note"] for r in results if r.get("note")), None)
    return row


def _row_order(row: dict, setting_names: list[str]) -> tuple:
    params = row.get("mean_active_params_mean")
    return (row["dataset"], -1.0 if params is None else params, row["method"],
            [_sortable(row.get(name)) for name in setting_names])


def _compact_mapping_settings(rows: list[dict], names: list[str]) -> None:
    """A setting whose values are mappings (a sweep over whole methods varies `method`) keeps only the
    keys that tell rows of one method label apart; the label already says the rest (`lora-8`), and the
    full values stay in the trial records."""
    for name in names:
        by_label: dict[str, list[dict]] = {}
        for row in rows:
            if isinstance(row.get(name), dict):
                by_label.setdefault(row["method"], []).append(row)
        for members in by_label.values():
            keys = sorted({k for r in members for k in r[name]})
            varying = [k for k in keys if len({_hashable(r[name].get(k)) for r in members}) > 1]
            for row in members:
                row[name] = {k: row[name][k] for k in varying if k in row[name]} or None  # absent: the default


def aggregate(sweep: dict, trials: list[dict]) -> dict:
    """The report dict (without `files`) from sweep.json and the trial records."""
    varied = list(sweep.get("varied") or [])
    task_metric = sweep.get("task_metric")
    finished, failed = _split_trials(trials)
    if task_metric is None and finished:
        task_metric = finished[0]["summary"].get("metric")
    lower_is_better = sweep.get("lower_is_better")
    if lower_is_better is None:
        lower_is_better = bool(finished and finished[0]["summary"].get("lower_is_better"))
    columns = setting_columns(varied)
    numeric = _numeric_columns(finished)
    groups = _group_rows(finished, columns)
    rows = [_output_row(g, numeric, f"{task_metric}_all") for g in _collapse(groups)]
    _compact_mapping_settings(rows, list(columns.values()))
    rows.sort(key=lambda r: _row_order(r, list(columns.values())))
    return {
        "name": sweep.get("name"),
        "metric": sweep.get("metric"),
        "task_metric": task_metric,
        "lower_is_better": bool(lower_is_better),
        "varied": varied,
        "setting_columns": columns,
        "rows": rows,
        "failed_trials": failed,
        "trials": len(trials),
    }


# ---------------------------------------------------------------------------------- the paper table


def column_label(row: dict, setting_names: list[str]) -> str:
    """Method label plus its non-null settings: `flexi-2-8 noise_std=0.1`."""
    parts = [row["method"]]
    for name in setting_names:
        value = row.get(name)
        if isinstance(value, dict):  # a compacted mapping setting: its distinguishing keys
            parts += [f"{k}={format_value(v)}" for k, v in value.items()]
        elif value is not None:
            parts.append(f"{name}={format_value(value)}")
    return " ".join(parts)


def table_columns(report: dict) -> list[dict]:
    """One entry per column identity: its rows by dataset and its average over all datasets.

    The average is the mean of the per-dataset means ± the root-mean-square of the per-dataset stds,
    and it is only given when the column has a value on every dataset (else it would mix datasets).
    """
    names = list(report.get("setting_columns", {}).values())
    metric = f"{report['task_metric']}_all"
    datasets = sorted({r["dataset"] for r in report["rows"]})
    columns: dict[str, dict] = {}
    for row in report["rows"]:
        label = column_label(row, names)
        columns.setdefault(label, {"label": label, "method": row["method"], "by_dataset": {}})
        columns[label]["by_dataset"][row["dataset"]] = row
    for col in columns.values():
        rows = list(col["by_dataset"].values())
        means = [r.get(f"{metric}_mean") for r in rows]
        stds = [r.get(f"{metric}_std") or 0.0 for r in rows]
        complete = len(rows) == len(datasets) and all(m is not None for m in means)
        col["mean"] = statistics.fmean(means) if complete else None
        col["std"] = math.sqrt(statistics.fmean(s * s for s in stds)) if complete else None
        params = [r["mean_active_params_mean"] for r in rows if r.get("mean_active_params_mean") is not None]
        pct = [r["params_pct_of_lora8_mean"] for r in rows if r.get("params_pct_of_lora8_mean") is not None]
        col["params"] = statistics.fmean(params) if params else None
        col["pct_lora8"] = statistics.fmean(pct) if pct else None
    # Columns of one method stay side by side (ordered by the method's mean size), then by setting values.
    method_params: dict[str, list[float]] = {}
    for col in columns.values():
        method_params.setdefault(col["method"], []).append(-1.0 if col["params"] is None else col["params"])

    def order(col: dict) -> tuple:
        row = next(iter(col["by_dataset"].values()))
        settings = [_sortable(row.get(name)) for name in names]
        return (statistics.fmean(method_params[col["method"]]), col["method"], settings)

    return sorted(columns.values(), key=order)


def _cell(mean: float | None, std: float | None) -> str:
    """`mean ± std` in %; a single seed has no spread to show, so its cell is the mean alone."""
    if mean is None:
        return "–"
    if std is None:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _seeds(col: dict) -> int:
    return min(r["seeds"] for r in col["by_dataset"].values())


def _params_cell(col: dict) -> str:
    if col["params"] is None:
        return "–"
    text = f"{col['params']:,.0f}"
    if col["pct_lora8"] is not None:
        text += f" ({col['pct_lora8']:.1f}%)"
    return text


def dataset_notes(report: dict) -> dict[str, str]:
    """Dataset → its note (e.g. "MultiArith (LLM-Adapters copy, 600 items; not the paper's 180-item split)")."""
    notes: dict[str, str] = {}
    for row in report["rows"]:
        if row.get("note"):
            notes.setdefault(row["dataset"], row["note"])
    return dict(sorted(notes.items()))


def _table_rows(report: dict) -> tuple[list[dict], list[dict]]:
    """The table's columns and its body rows: [{name, cells: [(mean, std) | None per column]}]."""
    metric = f"{report['task_metric']}_all"
    columns = table_columns(report)
    datasets = sorted({r["dataset"] for r in report["rows"]})
    body = []
    for dataset in datasets:
        cells = []
        for col in columns:
            row = col["by_dataset"].get(dataset)
            if row is None or row.get(f"{metric}_mean") is None:
                cells.append(None)
            else:
                cells.append((row[f"{metric}_mean"], row.get(f"{metric}_std") if row["seeds"] > 1 else None))
        body.append({"name": dataset, "cells": cells})
    body.append({"name": "Average", "cells": [(c["mean"], c["std"] if _seeds(c) > 1 else None)
                                              if c["mean"] is not None else None for c in columns]})
    return columns, body


def _best(cells: list, lower_is_better: bool) -> float | None:
    means = [c[0] for c in cells if c is not None]
    if not means:
        return None
    return min(means) if lower_is_better else max(means)


def _ci_text(row: dict, metric: str) -> str:
    low, high = row.get(f"{metric}_all_ci95_low"), row.get(f"{metric}_all_ci95_high")
    return "–" if low is None else f"{100 * low:.1f}–{100 * high:.1f}"


def _mean_std_text(row: dict, key: str) -> str:
    if row.get(f"{key}_mean") is None:
        return "–"
    return _cell(row[f"{key}_mean"], row.get(f"{key}_std") if row.get("seeds", 1) > 1 else None)


def _suffixes(rows: list[dict], prefix: str) -> list[str]:
    """`X` for every `<prefix>X_mean` column in `rows` (the item groups of a per-group metric)."""
    return sorted({k[len(prefix):-len("_mean")] for r in rows for k in r if k.startswith(prefix) and k.endswith("_mean")})


def _detail_rows(report: dict, columns: list[dict]) -> list[str]:
    """Rows under the main ones, per dataset: the metric's 95 % interval, the metric per item group
    (easy / hard), how often each group was routed to the high rank, and the router's held-out accuracy."""
    metric = report["task_metric"]
    datasets = sorted({r["dataset"] for r in report["rows"]})
    lines = []
    for dataset in datasets:
        rows = [c["by_dataset"].get(dataset) or {} for c in columns]
        prefix = f"{dataset} · " if len(datasets) > 1 else ""
        entries = [("95 % interval", [_ci_text(r, metric) for r in rows])]
        for group in _suffixes(rows, f"{metric}_"):
            if not group.startswith("all"):
                entries.append((group, [_mean_std_text(r, f"{metric}_{group}") for r in rows]))
        for group in _suffixes(rows, "high_rank_rate_"):
            entries.append((f"→ high rank, {group}", [_mean_std_text(r, f"high_rank_rate_{group}") for r in rows]))
        entries.append(("router held-out acc.", [_mean_std_text(r, "router_holdout_accuracy") for r in rows]))
        lines += [f"| {prefix}{name} | " + " | ".join(texts) + " |" for name, texts in entries
                  if any(t != "–" for t in texts)]
    return lines


def format_table(report: dict) -> str:
    """The paper-style Markdown table: datasets × methods, Average and `#` rows, and a footnote."""
    if not report["rows"]:
        return f"No finished trials to tabulate: all {report['trials']} trials failed.\n"
    columns, body = _table_rows(report)
    lower = report["lower_is_better"]
    metric = f"{report['task_metric']}_all"
    notes = dataset_notes(report)
    marks = {dataset: "†" * (i + 1) for i, dataset in enumerate(notes)}
    lines = ["| dataset | " + " | ".join(c["label"] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for line in body:
        best = _best(line["cells"], lower)
        texts = []
        for cell in line["cells"]:
            if cell is None:
                texts.append("–")
            elif cell[0] == best:
                texts.append(f"**{_cell(*cell)}**")
            else:
                texts.append(_cell(*cell))
        lines.append(f"| {line['name']}{marks.get(line['name'], '')} | " + " | ".join(texts) + " |")
    lines += _detail_rows(report, columns)
    lines.append("| # | " + " | ".join(_params_cell(c) for c in columns) + " |")
    lines.append("| seeds | " + " | ".join(str(_seeds(c)) for c in columns) + " |")
    direction = "lower" if lower else "higher"
    lines += [
        "",
        (f"Cells: `{metric}` in %, mean ± sample std over seeds (each distinct result counted once); "
         f"**bold** = best in the row ({direction} is better)."),
        ("Average: mean of the per-dataset means ± root-mean-square of the per-dataset stds "
         "(only for columns present on every dataset)."),
        "#: mean active parameters (mean over datasets) and, in parentheses, % of LoRA-8.",
        ("95 % interval: mean ± t₀.₉₇₅ · std / √seeds. Groups (easy, hard): the metric on that group's items. "
         "→ high rank: the share of the group's items that ran at the method's highest rank. Router held-out "
         "acc.: the difficulty router's accuracy on training rows it did not train on."),
    ]
    lines += [f"{marks[dataset]} {dataset}: {note}" for dataset, note in notes.items()]
    if "seed" not in report.get("varied", []):
        lines.append("One seed: a demonstration, not a result; add seeds to the sweep "
                     "(e.g. `sweep.space.seed=[0, 1, 2]`) before reading a difference.")
    elif any(_seeds(c) < 2 for c in columns):
        lines.append("A column with one result under a seed sweep does not depend on the seed (e.g. the base model).")
    if report.get("failed_trials"):
        lines.append(f"{len(report['failed_trials'])} of {report['trials']} trials did not finish (failed or stopped "
                     f"early) and are left out.")
    return "\n".join(lines) + "\n"


def format_csv(report: dict) -> str:
    """The same table as CSV: per column the text cell plus numeric mean and std (in %)."""
    columns, body = _table_rows(report)
    out = io.StringIO()
    writer = csv.writer(out)
    notes = dataset_notes(report)
    header = ["dataset"]
    for col in columns:
        header += [col["label"], f"{col['label']} mean (%)", f"{col['label']} std (%)"]
    writer.writerow(header + ["note"])
    for line in body:
        record = [line["name"]]
        for cell in line["cells"]:
            if cell is None:
                record += ["–", "", ""]
            else:
                record += [_cell(*cell), f"{100 * cell[0]:.4f}", "" if cell[1] is None else f"{100 * cell[1]:.4f}"]
        writer.writerow(record + [notes.get(line["name"], "")])
    # The `#` row: mean column = mean active parameters; the % of LoRA-8 is in the text cell.
    record = ["#"]
    for col in columns:
        record += [_params_cell(col), "" if col["params"] is None else f"{col['params']:.1f}", ""]
    writer.writerow(record)
    return out.getvalue()


# ------------------------------------------------------------------------------------------- writing


def _write_text_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _plots(report: dict, out: Path) -> list[Path]:
    from flexi_workflows import report_plots

    metric = f"{report['task_metric']}_all"
    lower = report["lower_is_better"]
    names = list(report["setting_columns"].values())
    several = len({r["dataset"] for r in report["rows"]}) > 1
    files = []

    # Pareto: one point per column identity (dataset average when there are several datasets).
    points = []
    for col in table_columns(report):
        if col["params"] is None or col["mean"] is None:
            continue
        points.append({"label": col["label"], "x": col["params"], "y": 100 * col["mean"],
                       "yerr": 100 * col["std"]})
    title = f"{metric} vs active parameters" + (" (mean over datasets)" if several else "")
    files.append(report_plots.pareto_plot(points, out / "pareto.png", ylabel=f"{metric} (%)",
                                          lower_is_better=lower, title=title))

    # Routed-rank shares of every row that routes between more than one rank.
    bars = []
    for row in report["rows"]:
        shares = row.get("rank_shares")
        if shares and len(shares) > 1:
            label = column_label(row, names) + (f"\n{row['dataset']}" if several else "")
            bars.append({"label": label, "shares": shares})
    files.append(report_plots.rank_shares_plot(bars, out / "rank_shares.png"))

    # Metric against the router's σ, only when the sweep varied it: one panel per dataset.
    noise_col = report["setting_columns"].get(NOISE_KEY)
    if noise_col is not None and report["rows"]:
        others = [n for n in names if n != noise_col]
        panels = []
        for dataset in sorted({r["dataset"] for r in report["rows"]}):
            lines: dict[str, list] = {}
            references = []
            for row in report["rows"]:
                if row["dataset"] != dataset or row.get(f"{metric}_mean") is None:
                    continue
                label = column_label(row, others)
                mean, std = 100 * row[f"{metric}_mean"], 100 * (row.get(f"{metric}_std") or 0.0)
                if row.get(noise_col) is None:
                    references.append({"label": label, "y": mean})
                else:
                    lines.setdefault(label, []).append((float(row[noise_col]), mean, std))
            series = [{"label": label, "points": sorted(points)} for label, points in lines.items()]
            panels.append({"title": f"{metric} vs {noise_col} — {dataset}", "series": series,
                           "references": references})
        files.append(report_plots.metric_vs_noise_plot(panels, out / "metric_vs_noise.png", xlabel=noise_col,
                                                       ylabel=f"{metric} (%)"))
    return files


def build_report(sweep_dir: str | Path) -> dict:
    """Aggregate a sweep's trials and (re)write `<sweep_dir>/report/`; returns the report.json dict."""
    sweep_dir = Path(sweep_dir)
    sweep, trials = load_sweep(sweep_dir)
    report = aggregate(sweep, trials)
    table_md = format_table(report)
    table_csv = format_csv(report)

    # Everything that can fail on bad input has run; only now replace the old report folder.
    out = sweep_dir / REPORT_DIR
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    files = [_write_text_atomic(out / "table.md", table_md), _write_text_atomic(out / "table.csv", table_csv)]
    files += _plots(report, out)
    files.append(out / "report.json")
    report["files"] = [str(f) for f in files]
    # report.json goes last: its presence means the folder is complete.
    _write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report
