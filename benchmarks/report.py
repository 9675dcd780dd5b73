"""The performance tables: every benchmark result in benchmarks/results/ as Markdown.

One table per result file (one benchmark run), in the order of :data:`READERS`, under a
bold lead-in line that names the benchmark and gives the command that wrote the file, the
machine and the date once. Each row is one case, with the columns

    what | ours | peer | ours / peer

where *peer* is the independent implementation measured in the same run (POT, PyTorch, or
for the training results the supervised baseline), so the ratio is the number to read:
below 1 for a time means we are faster. Should the rows of one file differ in command,
machine or date, the lead-in says "per row" for it and the table gets a column for it.
Files that are absent are skipped; a JSON file that no reader knows is listed on stderr and
skipped.

The accuracy tables on digits (``digits_results*.json``, written by ``swav-ref demo``) are
made here too, one per file, with the per-seed differences between methods, so that no number
in them is copied by hand.

Usage::

    python benchmarks/report.py            # print the tables
    python benchmarks/report.py --write    # also replace the block between
                                           # <!-- report:start --> and <!-- report:end -->
                                           # in README.md and docs/results.md, and each
                                           # <!-- digits:FILE:start --> ... :end --> block
    python benchmarks/report.py --results-dir $OUT   # a GPU run's tables, printed only

``--write`` into README.md and docs/results.md reads benchmarks/results/ only: the tables
are rebuilt from one folder, so a GPU run's $OUT alone would drop every CPU row. Copy its
files into benchmarks/results/ first.

Dates: a result without a ``date`` field gets the date of the commit that last changed its
file (a fresh clone's files all have today's modification date), or its modification date
when it has changed since that commit or is not in git. Machines:
GPU results without a ``machine`` field take the first line of ``gpu_machine.txt``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
START, END = "<!-- report:start -->", "<!-- report:end -->"
TARGETS = (ROOT / "README.md", ROOT / "docs" / "results.md")
#: Training results of ``swav-ref demo`` that the lead copies in (looked up in this order).
TRAINING_RESULTS = ("digits_results.json",)
#: ``swav-ref demo`` results shown as accuracy tables of their own (:func:`accuracy_table`),
#: each between ``<!-- digits:NAME:start -->`` and ``<!-- digits:NAME:end -->``.
DIGITS_TABLES = ("digits_results_60_epochs.json", "digits_results.json", "digits_results_deepcluster_3_sets.json")
#: How the accuracy tables name the rows.
METHOD_LABELS = {"random init": "random init (same network, untrained)", "SwAV": "SwAV (no labels)",
                 "DeepCluster-v2": "DeepCluster-v2 (no labels)", "supervised": "supervised (same network, labels)"}
SELF_SUPERVISED = ("SwAV", "DeepCluster-v2")


@dataclass
class Row:
    """One case: ``ours`` and ``peer`` in ``unit`` (``"s"``, ``"B"`` or ``"%"``).
    ``recorded_ratio`` is the ratio the benchmark computed from its unrounded times, where
    its file records one: the times it stores are rounded (0.023 s against 0.0037 s), and
    their quotient can be off in the second digit."""

    what: str
    ours: float | None
    peer: float | None
    unit: str
    machine: str
    date: str
    command: str
    recorded_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.peer is None or self.peer == 0:
            return None
        return self.recorded_ratio if self.recorded_ratio is not None else self.ours / self.peer


#: What a group's lead-in gives once, and the table a column of when its rows differ.
SHARED_FIELDS = ("command", "machine", "date")


@dataclass
class Group:
    """The rows of one result file: one table under one lead-in line."""

    title: str
    source: str  # the result file's name
    rows: list[Row]

    def shared(self, field: str) -> str | None:
        """The ``field`` (see :data:`SHARED_FIELDS`) of every row, or None when they differ."""
        values = {getattr(r, field) for r in self.rows}
        return values.pop() if len(values) == 1 else None

    @property
    def varying(self) -> tuple[str, ...]:
        """The fields of :data:`SHARED_FIELDS` that differ between the rows: table columns."""
        return tuple(f for f in SHARED_FIELDS if self.shared(f) is None and self.rows)


# -- formatting ------------------------------------------------------------------------------
def format_value(value: float | None, unit: str) -> str:
    """``0.0021`` s -> ``2.10 ms``; bytes in KiB/MiB; percentages with one decimal."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= scale or name == "µs":
                return f"{value / scale:.3g} {name}"
    if unit == "B":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.0f} B"
    if unit == "%":
        return f"{value:.1f}%"
    if float(value).is_integer():  # a count: every digit
        return f"{int(value):,} {unit}".strip()
    return f"{value:.3g} {unit}".strip()


def _cell(field: str, value: str) -> str:
    return f"`{value}`" if field == "command" else value


def markdown_table(rows: Sequence[Row], extra: Sequence[str] = ()) -> str:
    """The rows as a GitHub-flavoured Markdown table: what | ours | peer | ours / peer, then a
    column for each of ``extra`` (fields of :data:`SHARED_FIELDS`)."""
    lines = ["| " + " | ".join(["what", "ours", "peer", "ours / peer", *extra]) + " |",
             "|---|---:|---:|---:|" + "---|" * len(extra)]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3g}"
        cells = [r.what, format_value(r.ours, r.unit), format_value(r.peer, r.unit), ratio,
                 *(_cell(f, getattr(r, f)) for f in extra)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def lead_in(group: Group) -> str:
    """The bold line above a group's table: its title, then the command, the machine and the
    date (``per row`` for any that differ between the rows, which the table then shows)."""
    marked = " (*before the fused kernels*)" if group.rows and all(BEFORE_FUSED in r.what for r in group.rows) else ""
    given = []
    for field in SHARED_FIELDS:
        value = group.shared(field)
        given.append(f"{field}: " + ("per row" if value is None else _cell(field, value)))
    text = "; ".join(given)
    return f"**{group.title}**{marked}. {text[:1].upper()}{text[1:]}."


def markdown_report(groups: Sequence[Group]) -> str:
    """Every group as its lead-in line and its table, in order; blank lines between blocks."""
    blocks = [f"{lead_in(g)}\n\n{markdown_table(g.rows, g.varying)}" for g in groups if g.rows]
    return "\n\n".join(blocks) if blocks else "No benchmark results yet."


def _mean_sd(values: Sequence[float]) -> str:
    """Percent, one decimal: ``97.9 ± 0.6`` (sample sd over seeds); ``97.9`` for one value or
    for a value that every seed gave (a baseline with nothing random in it)."""
    if len(set(values)) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def accuracy_table(data: dict) -> str:
    """A ``swav-ref demo`` results file as a Markdown table (mean ± sd over seeds, %), then
    the per-seed differences on the linear probe between each self-supervised method and
    the baselines: every seed scores both rows on the same test images, so the difference
    of each seed's pair is what separates two methods, and its spread shows whether it does.
    The size of one test image in points says what the table can resolve."""
    metrics = data["metrics"]
    results = {r["method"]: r for r in data["results"]}
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for method, entry in results.items():
        cells = [_mean_sd(entry[m]["values"]) if entry.get(m, {}).get("values") else "-" for m in metrics]
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    probe = "linear probe"
    learnt = [m for m in SELF_SUPERVISED if m in results]
    pairs = [(b, a) for i, a in enumerate(learnt) for b in learnt[i + 1:]]  # between the methods
    pairs += [(m, baseline) for m in learnt for baseline in ("supervised", "raw pixels", "random init")]
    gaps = []
    for method, other in pairs:
        ours = results[method].get(probe, {}).get("values", [])
        theirs = results.get(other, {}).get(probe, {}).get("values", [])
        if ours and len(theirs) == len(ours):
            diffs = [a - b for a, b in zip(ours, theirs)]
            sd = f" ± {100 * statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
            mean = f"{100 * statistics.mean(diffs):+.1f}".replace("-", "−")  # a minus sign, not a hyphen
            gaps.append(f"{method} − {other} {mean}{sd}")
    text = "\n".join(lines)
    if gaps:
        n_seeds = len(results[learnt[0]][probe]["values"])
        text += (f"\n\nPer-seed differences on the linear probe, in points (mean ± sd over {n_seeds} seeds): "
                 + "; ".join(gaps) + ".")
    n_test = data.get("metadata", {}).get("test_images")
    if n_test:
        text += f" One test image is {100 / n_test:.2f} points ({n_test} test images)."
    return text


def digits_markers(name: str) -> tuple[str, str]:
    return f"<!-- digits:{name}:start -->", f"<!-- digits:{name}:end -->"


def replace_block(text: str, block: str, path: str = "the file", markers: tuple[str, str] = (START, END)) -> str:
    """``text`` with everything between the markers (by default the report's) replaced by ``block``.

    Raises ValueError when the markers are missing, repeated or out of order.
    """
    START, END = markers
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"{path}: needs exactly one {START} and one {END} marker "
                         f"(found {text.count(START)} and {text.count(END)})")
    head, rest = text.split(START)
    if END not in rest:
        raise ValueError(f"{path}: {END} comes before {START}")
    _, tail = rest.split(END)
    return f"{head}{START}\n{block.strip()}\n{END}{tail}"


# -- readers: one per result file -------------------------------------------------------------
def _date(data: dict, path: Path) -> str:
    for date in (data.get("date"), data.get("metadata", {}).get("date")):
        if date:
            return str(date)
    return _file_date(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _file_date(path: Path, mtime_ns: int) -> str:
    """The date of a result file that records none; asked once per file and version (two
    git processes), not once per row."""
    try:  # the day the result was committed: a clone or checkout gives every file a new mtime
        git = dict(cwd=path.parent, capture_output=True, text=True, timeout=30)
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path.name], **git).returncode != 0
        committed = "" if changed else subprocess.run(["git", "log", "-1", "--format=%cs", "--", path.name],
                                                      **git).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        committed = ""
    # re-measured and not yet committed (or outside git): the file's own date
    return committed or datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()


def _gpu_machine(results_dir: Path) -> str:
    info = results_dir / "gpu_machine.txt"
    if info.exists():
        first = info.read_text(encoding="utf-8").strip().splitlines()
        if first:
            return first[0].split(",")[0].strip()
    return "GPU"


def _cpu_machine(data: dict) -> str:
    machine = data.get("machine")
    if isinstance(machine, dict):
        cores = machine.get("cpu_count")
        return f"CPU ({cores} cores)" if cores else "CPU"
    return f"CPU ({machine})" if machine else "CPU"


def read_sinkhorn(data: dict, path: Path, results_dir: Path) -> list[Row]:
    rows = []
    dtype = data.get("settings", {}).get("dtype", "float64")
    for case in data.get("results", []):
        for domain in ("kernel", "log"):
            if domain not in case:
                continue
            rows.append(Row(
                f"Sinkhorn, {domain} domain, n={case['n']}, {dtype}: ours vs POT (same iterations)",
                case[domain]["ours"]["time_s"], case[domain]["pot_matched"]["time_s"], "s",
                _cpu_machine(data), _date(data, path), "python benchmarks/bench_sinkhorn.py"))
    return rows


def read_loss(data: dict, path: Path, results_dir: Path) -> list[Row]:
    gpu = data.get("backend") == "cupy"
    machine = _gpu_machine(results_dir) if gpu else _cpu_machine(data)
    peer = "torch CUDA" if gpu else "torch CPU"
    command = "python benchmarks/bench_loss.py" + (" --backend cupy" if gpu else "")
    return [
        Row(f"SwAV loss fwd+bwd, B={c['batch_size']}, K={c['n_prototypes']}, {c['n_crops']} crops: "
            f"ours ({'CuPy' if gpu else 'NumPy'}) vs official loop ({peer} autograd)"
            + (_gpu_provenance(data) if gpu else ""),
            c["ours_s"], c.get("torch_official_s"), "s", machine, _date(data, path), command)
        for c in data.get("results", [])
    ]


def read_resnet(data: dict, path: Path, results_dir: Path) -> list[Row]:
    gpu = data.get("backend") == "cupy"
    machine = _gpu_machine(results_dir) if gpu else _cpu_machine(data)
    sides = "ours (CuPy) vs torch CUDA" if gpu else "ours (NumPy) vs torch CPU"
    if gpu:
        sides += f", {data.get('precision', OLD_GPU_PRECISION)}"
    command = "python benchmarks/bench_resnet.py" + (" --backend cupy" if gpu else "")
    if data.get("tf32"):
        command += " --tf32"
    rows = []
    for name, c in data.get("cases", {}).items():
        shape = "x".join(str(s) for s in c.get("input", []))
        rows.append(Row(f"{name} training step, batch {c.get('batch')}, {shape}, float32: {sides}"
                        + (_gpu_provenance(data) if gpu else ""),
                        c.get("ours_step_s"), c.get("torch_step_s"), "s", machine, _date(data, path), command,
                        recorded_ratio=c.get("ratio_ours_over_torch")))
    return rows


BEFORE_FUSED = " (before the fused kernels)"
#: GPU network steps timed before the benchmarks set TF32 alike on both sides: PyTorch kept
#: its default (cuDNN convolutions in TF32), ours computed in true float32.
OLD_GPU_PRECISION = "torch with its default TF32 convolutions, ours true float32"


def _gpu_provenance(data: dict) -> str:
    """A GPU result written before ``swav_ref.fused`` existed says so in its row (newer files
    record ``fused_kernels``; the next GPU check replaces the old ones)."""
    return BEFORE_FUSED if "fused_kernels" not in data else ""


def read_gpu(data: dict, path: Path, results_dir: Path) -> list[Row]:
    machine = data.get("machine") or _gpu_machine(results_dir)
    command = data.get("command", "python benchmarks/bench_gpu.py")
    rows = []
    for name, c in data.get("cases", {}).items():
        if "error" in c:
            print(f"report: {path.name}: case {name} failed: {c['error']}", file=sys.stderr)
            continue
        if "unavailable" in c:  # a case the GPU library cannot run: a row that says so
            rows.append(Row(c["what"] + _gpu_provenance(data), None, None, "s", machine, _date(data, path), command))
            continue
        ours = c.get("ours_ms")
        peer = c.get("torch_ms", c.get("peer_ms"))
        what = c.get("what")  # newer files describe each case, peer included
        if what is None:
            what = f"{name}: ours (CuPy) vs torch CUDA" if peer is not None else f"{name}: ours (CuPy), no peer"
            if peer is not None and "resnet" in name:
                what += f" ({OLD_GPU_PRECISION})"
            if "images_per_s" in c:
                what += f" ({c['images_per_s']:.0f} images/s)"
        what += _gpu_provenance(data)
        rows.append(Row(what, None if ours is None else ours / 1e3, None if peer is None else peer / 1e3, "s",
                        machine, _date(data, path), command))
    return rows


def read_equivalence(data: dict, path: Path, results_dir: Path) -> list[Row]:
    if "error" in data:
        print(f"report: {path.name}: the comparison failed: {data['error']}", file=sys.stderr)
        return []
    code = {True: "CuPy with fused kernels", False: "plain CuPy code"}.get(data.get("fused_kernels"),
                                                                           "CuPy" + BEFORE_FUSED)
    what = (f"{data.get('steps', '?')} SwAV training steps on digits: {code} vs NumPy (same seed; largest "
            f"relative loss difference {data.get('max_relative_difference', float('nan')):.1e})")
    # newer files record their command; older ones say by fused_kernels whether the
    # environment switched the fused kernels off
    command = data.get("command") or (("SWAV_REF_FUSED=0 " if data.get("fused_kernels") is False else "")
                                      + "python benchmarks/gpu_equivalence.py")
    return [Row(what, data.get("cupy_seconds"), data.get("numpy_seconds"), "s",
                data.get("machine") or _gpu_machine(results_dir), _date(data, path), command)]


def read_launches(data: dict, path: Path, results_dir: Path) -> list[Row]:
    """``bench_launches.py``: kernels launched per step, fused path (ours) vs plain code (peer)."""
    command = data.get("command", "python benchmarks/bench_launches.py")
    return [Row(c["what"], c["fused"]["kernels"], c["plain"]["kernels"], "launches", "any (exact counts)",
                _date(data, path), command) for c in data.get("cases", {}).values()]


def read_host(data: dict, path: Path, results_dir: Path) -> list[Row]:
    """``bench_host.py``: host time of one step, each of our sides against torch CPU."""
    sides = data.get("sides", {})
    torch = sides.get("torch")
    if torch is None:
        return []
    labels = {"ours_plain": "ours (plain code)", "ours_fused_issue_only": "ours (fused path, launches issued only)"}
    setting = data.get("setting", "a small resnet18-structured step")
    return [Row(f"host time of an SGD training step, {setting}: {label} vs torch CPU", sides[side]["step_ms"] / 1e3, torch["step_ms"] / 1e3, "s",
                data.get("machine") or "CPU", _date(data, path), data.get("command", "python benchmarks/bench_host.py"))
            for side, label in labels.items() if side in sides]


def read_deepcluster_scaling(data: dict, path: Path, results_dir: Path) -> list[Row]:
    rows_in = data.get("results", [])
    by = {(r["method"], r["repeats"]): r for r in rows_in}
    machine, date = data.get("machine") or "CPU", _date(data, path)
    command = data.get("command", "python benchmarks/bench_deepcluster_scaling.py")
    rows = []
    for repeats in sorted({r["repeats"] for r in rows_in}):
        swav, dc = by.get(("swav", repeats)), by.get(("deepcluster-v2", repeats))
        if swav is None or dc is None:
            continue
        rows.append(Row(f"time per epoch, digits x{repeats} (N={swav['n_images']}): SwAV vs DeepCluster-v2 "
                        "(extrapolated from timed steps)", swav["epoch_s"], dc["epoch_s"], "s", machine, date,
                        command))
    if by:
        largest = max(r for _, r in by)
        swav, dc = by.get(("swav", largest)), by.get(("deepcluster-v2", largest))
        if swav is not None and dc is not None:
            rows.append(Row(f"method state beyond the model, digits x{largest} (N={swav['n_images']}): SwAV "
                            "(no queue) vs DeepCluster-v2 (memory bank + targets)", swav["state_bytes"],
                            dc["state_bytes"], "B", machine, date, command))
    return rows


def read_threads(data: dict, path: Path, results_dir: Path) -> list[Row]:
    """``bench_threads.py``: --threads 1 against the BLAS default, quiet and with a busy core."""
    threads = data.get("default_blas_threads") or "one per core"
    return [Row(f"{data.get('what', 'SwAV training on digits')}, {name}: --threads 1 vs the BLAS default "
                f"({threads} threads)", case["one_thread_s"], case["default_s"], "s", data.get("machine") or "CPU",
                _date(data, path), data.get("command", "python benchmarks/bench_threads.py"))
            for name, case in data.get("conditions", {}).items()]


def read_knn(data: dict, path: Path, results_dir: Path) -> list[Row]:
    """``bench_knn.py``: ``knn_predict`` against scikit-learn's search and against the full sort."""
    rows = []
    for name, case in data.get("cases", {}).items():
        what = f"{data.get('what', 'kNN evaluation')}, {name}"
        peers = (("sklearn_search_s", "scikit-learn's brute-force cosine search (search only)"),
                 ("full_sort_s", "the same vote with a full sort of each row (before the partition)"))
        rows += [Row(f"{what}: ours vs {peer}", case["ours_s"], case[key], "s", data.get("machine") or "CPU",
                     _date(data, path), data.get("command", "python benchmarks/bench_knn.py"))
                 for key, peer in peers if key in case]
    return rows


def read_training(data: dict, path: Path, results_dir: Path) -> list[Row]:
    """``swav-ref demo``'s results.json: each self-supervised method against supervised."""
    results = {r["method"]: r for r in data.get("results", [])}
    meta = data.get("metadata", {})
    seeds = meta.get("seeds", [0])
    methods = meta.get("methods", ["swav"])
    epochs = meta.get("config", {}).get("epochs")
    prototypes = meta.get("config", {}).get("n_prototypes")
    command = (f"swav-ref demo{'' if epochs is None else f' --epochs {epochs}'} --methods {' '.join(methods)} "
               f"--seeds {' '.join(str(s) for s in seeds)}"
               + (f" --n-prototypes {' '.join(str(k) for k in prototypes)}" if prototypes else ""))
    supervised = results.get("supervised", {})
    rows = []
    for method, entry in results.items():
        if method in ("supervised",):
            continue
        for metric in data.get("metrics", []):
            ours, peer = entry.get(metric, {}).get("mean"), supervised.get(metric, {}).get("mean")
            rows.append(Row(f"digits top-1, {metric}: {method} vs supervised (same network), "
                            f"{len(seeds)} seed(s)", None if ours is None else 100 * ours,
                            None if peer is None else 100 * peer, "%", meta.get("machine", "CPU"),
                            _date(data, path), command))
    return rows


Reader = Callable[[dict, Path, Path], list[Row]]

#: File name -> reader, in the order the tables list them.
READERS: dict[str, Reader] = {
    "bench_sinkhorn.json": read_sinkhorn,
    "bench_loss.json": read_loss,
    "bench_resnet.json": read_resnet,
    "bench_loss_gpu.json": read_loss,
    "bench_resnet_cupy.json": read_resnet,
    "bench_gpu.json": read_gpu,
    "bench_gpu_probes.json": read_gpu,
    "gpu_equivalence.json": read_equivalence,
    "gpu_equivalence_plain.json": read_equivalence,
    "bench_launches.json": read_launches,
    "bench_host.json": read_host,
    "bench_deepcluster_scaling.json": read_deepcluster_scaling,
    "bench_threads.json": read_threads,
    "bench_knn.json": read_knn,
    **{name: read_training for name in TRAINING_RESULTS},
    # gpu_check.sh's record of its steps (commands, seconds, exit codes): for people, no table
    "gpu_check.json": lambda data, path, results_dir: [],
    # shown as accuracy tables of their own (DIGITS_TABLES), not as rows of this one
    **{name: lambda data, path, results_dir: [] for name in DIGITS_TABLES if name not in TRAINING_RESULTS},
}


#: File name -> the title of its group (the bold start of its lead-in line).
TITLES: dict[str, str] = {
    "bench_sinkhorn.json": "Sinkhorn, ours vs POT (CPU)",
    "bench_loss.json": "SwAV loss, ours vs PyTorch (CPU)",
    "bench_resnet.json": "ResNet training step, ours vs PyTorch (CPU)",
    "bench_loss_gpu.json": "SwAV loss, ours vs PyTorch (GPU)",
    "bench_resnet_cupy.json": "ResNet training step, ours vs PyTorch (GPU)",
    "bench_gpu.json": "GPU benchmark: Sinkhorn, loss, ResNet step, SwAV step",
    "bench_gpu_probes.json": "GPU probes: where the ResNet step's time goes (profile, CUDA graphs, host floor, "
                             "launch cost, BatchNorm sums)",
    "gpu_equivalence.json": "The first training steps, CuPy vs NumPy (GPU)",
    "gpu_equivalence_plain.json": "The first training steps, plain CuPy code vs NumPy (GPU)",
    "bench_launches.json": "GPU kernel launches per training step, fused path vs plain code",
    "bench_host.json": "Host time of a training step, ours vs PyTorch (CPU)",
    "bench_deepcluster_scaling.json": "SwAV vs DeepCluster-v2 as the data grow (CPU)",
    "bench_threads.json": "One BLAS thread vs the default (CPU)",
    "bench_knn.json": "kNN evaluation, ours vs scikit-learn (CPU)",
    **{name: "Accuracy on digits, each method vs the supervised network" for name in TRAINING_RESULTS},
}


def collect_groups(results_dir: Path = RESULTS, extra: Iterable[Path] = (), warn=None) -> list[Group]:
    """Every known result file in ``results_dir`` (and the training results in ``extra``) as a
    :class:`Group` of its rows, in the order of :data:`READERS`; files without rows give none."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    results_dir = Path(results_dir)
    groups: list[Group] = []
    for name, reader in READERS.items():
        path = results_dir / name
        if path.exists():
            groups.append(Group(TITLES.get(name, name), name, _read(path, reader, results_dir, warn)))
    for path in extra:
        path = Path(path)
        if path.exists() and path.parent.resolve() != results_dir.resolve():
            groups.append(Group(f"Accuracy on digits ({path.name}), each method vs the supervised network",
                                path.name, _read(path, read_training, results_dir, warn)))
    for path in sorted(results_dir.glob("*.json")):
        if path.name not in READERS:
            warn(f"report: no reader for {path.name}; skipped")
    return [g for g in groups if g.rows]


def collect_rows(results_dir: Path = RESULTS, extra: Iterable[Path] = (), warn=None) -> list[Row]:
    """The rows of :func:`collect_groups`, one list in the same order."""
    return [r for g in collect_groups(results_dir, extra, warn) for r in g.rows]


def _read(path: Path, reader: Reader, results_dir: Path, warn) -> list[Row]:
    try:
        return reader(json.loads(path.read_text(encoding="utf-8")), path, results_dir)
    except (ValueError, KeyError, TypeError) as exc:  # a malformed file must not hide the others
        warn(f"report: could not read {path}: {type(exc).__name__}: {exc}; skipped")
        return []


def digits_blocks(results_dir: Path = RESULTS) -> dict[str, str]:
    """``{file name: accuracy table}`` for each of :data:`DIGITS_TABLES` in ``results_dir``."""
    return {name: accuracy_table(json.loads((results_dir / name).read_text(encoding="utf-8")))
            for name in DIGITS_TABLES if (results_dir / name).exists()}


def write_block(path: Path, block: str, markers: tuple[str, str] = (START, END)) -> bool:
    """Replace the marked block of ``path``; False (with a message) when it has no markers."""
    text = path.read_text(encoding="utf-8")
    try:
        new = replace_block(text, block, str(path), markers)
    except ValueError as exc:
        print(f"report: {exc}; not written", file=sys.stderr)
        return False
    path.write_text(new, encoding="utf-8", newline="\n")  # not the locale's code page or \r\n on Windows
    return True


def refuse_partial_write(results_dir: Path, targets: Sequence[Path]) -> str | None:
    """Why ``--write`` must not run, or None. The README's and the course's tables are rebuilt
    from one results folder: from any other than benchmarks/results/ (a GPU run's $OUT, say)
    they would lose every row that folder lacks, the CPU ones among them."""
    if Path(results_dir).resolve() == RESULTS.resolve():
        return None
    committed = {t.resolve() for t in TARGETS}
    hit = [t for t in targets if Path(t).resolve() in committed]
    if not hit:
        return None  # other pages: the caller chose what they show
    return (f"--write with --results-dir {results_dir} would rebuild the tables of "
            f"{', '.join(str(t) for t in hit)} from that folder alone and drop every row it lacks (the CPU rows "
            f"among them). Copy the new result files into {RESULTS} first (e.g. cp {results_dir}/bench_gpu.json "
            f"{RESULTS}/), then run: python benchmarks/report.py --write")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--training", type=Path, nargs="*", default=[],
                   help="more training results (swav-ref demo's results.json) to add as rows")
    p.add_argument("--write", action="store_true",
                   help="replace the marked block in the target files (README and docs only from benchmarks/results/)")
    p.add_argument("--targets", type=Path, nargs="+", default=list(TARGETS))
    args = p.parse_args(argv)
    if args.write:
        reason = refuse_partial_write(args.results_dir, args.targets)
        if reason:
            print(f"report: {reason}", file=sys.stderr)
            return 2
    table = markdown_report(collect_groups(args.results_dir, args.training))
    print(table)
    digits = digits_blocks(args.results_dir)
    for name, block in digits.items():
        print(f"\n{name}:\n{block}")
    if args.write:
        for target in args.targets:
            if not target.exists():
                print(f"report: {target} does not exist; skipped", file=sys.stderr)
                continue
            if write_block(target, table):
                print(f"report: wrote the tables into {target}", file=sys.stderr)
            text = target.read_text(encoding="utf-8")
            for name, block in digits.items():
                markers = digits_markers(name)
                if markers[0] in text and write_block(target, block, markers):
                    print(f"report: wrote the {name} table into {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
