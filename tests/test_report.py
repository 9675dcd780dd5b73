"""benchmarks/report.py: the performance tables from small fake result files."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import required

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    write(d / "bench_sinkhorn.json", {
        "settings": {"dtype": "float64"},
        "machine": {"cpu_count": 2},
        "results": [{"n": 500, "kernel": {"ours": {"time_s": 0.002}, "pot_matched": {"time_s": 0.008}}}],
    })
    write(d / "bench_gpu.json", {
        "date": "2031-01-02", "machine": "Fake GPU", "command": "python benchmarks/bench_gpu.py",
        "cases": {"sinkhorn_case": {"ours_ms": 3.0, "torch_ms": 1.5},
                  "step_case": {"ours_ms": 10.0, "images_per_s": 99.0}},
    })
    write(d / "bench_deepcluster_scaling.json", {
        "date": "2031-01-03", "machine": "x86_64 (2 cores)",
        "command": "python benchmarks/bench_deepcluster_scaling.py",
        "results": [
            {"method": "swav", "repeats": 1, "n_images": 100, "epoch_s": 1.0, "state_bytes": 0},
            {"method": "deepcluster-v2", "repeats": 1, "n_images": 100, "epoch_s": 4.0, "state_bytes": 2048},
        ],
    })
    return d


def test_rows_and_ratios(report, results):
    rows = report.collect_rows(results)
    by_what = {r.what: r for r in rows}
    sinkhorn = next(r for r in rows if r.what.startswith("Sinkhorn, kernel domain, n=500"))
    assert sinkhorn.ours == 0.002 and sinkhorn.peer == 0.008
    assert sinkhorn.ratio == pytest.approx(0.25)
    gpu = next(r for r in rows if r.what.startswith("sinkhorn_case"))
    assert gpu.ratio == pytest.approx(2.0) and gpu.machine == "Fake GPU" and gpu.date == "2031-01-02"
    no_peer = next(r for r in rows if r.what.startswith("step_case"))
    assert no_peer.peer is None and no_peer.ratio is None
    epoch = next(r for r in rows if r.what.startswith("time per epoch"))
    assert epoch.ratio == pytest.approx(0.25)
    assert len(by_what) == len(rows) == 5  # 1 sinkhorn + 2 gpu + time and memory rows


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table line (``\\|`` is a bar inside a cell)."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_markdown_table_shows_values_and_ratio(report, results):
    table = report.markdown_table(report.collect_rows(results))
    lines = table.splitlines()
    assert lines[0] == "| what | ours | peer | ours / peer |"  # machine, date, command: in the lead-in
    sinkhorn = next(line for line in lines if line.startswith("| Sinkhorn"))
    assert _cells(sinkhorn)[1:] == ["2 ms", "8 ms", "0.25"]
    memory = next(line for line in lines if "method state" in line)
    assert "2 KiB" in memory and "| 0 B |" in memory
    assert len(lines) == 2 + 5
    wide = report.markdown_table(report.collect_rows(results), ("date", "command")).splitlines()
    assert wide[0] == "| what | ours | peer | ours / peer | date | command |" and wide[1].count("|") == 7
    sinkhorn = next(line for line in wide if line.startswith("| Sinkhorn"))
    assert _cells(sinkhorn)[5] == "`python benchmarks/bench_sinkhorn.py`"


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """The report as (lead-in line, table lines) pairs, checking its Markdown on the way: each
    lead-in a one-line bold paragraph, each table right after it with a blank line between,
    a header, a delimiter row and rows with as many cells as the header."""
    paragraphs = text.strip().split("\n\n")
    assert len(paragraphs) % 2 == 0, paragraphs
    pairs = []
    for lead, table in zip(paragraphs[::2], paragraphs[1::2]):
        assert "\n" not in lead and lead.startswith("**") and not lead.startswith("|"), lead
        lines = table.splitlines()
        header = _cells(lines[0])
        assert header[:4] == ["what", "ours", "peer", "ours / peer"], lines[0]
        assert set(header[4:]) <= {"command", "machine", "date"} and len(lines) > 2
        assert _cells(lines[1]) == ["---", "---:", "---:", "---:"] + ["---"] * (len(header) - 4)
        assert all(len(_cells(line)) == len(header) for line in lines[2:]), table
        pairs.append((lead, lines))
    return pairs


def test_one_table_per_result_file_under_a_lead_in_with_command_machine_and_date(report, results):
    groups = report.collect_groups(results)
    assert [g.source for g in groups] == ["bench_sinkhorn.json", "bench_gpu.json", "bench_deepcluster_scaling.json"]
    assert [len(g.rows) for g in groups] == [1, 2, 2]
    text = report.markdown_report(groups)
    blocks = _blocks(text)
    assert len(blocks) == 3
    for group, (lead, lines) in zip(groups, blocks):
        assert lead.startswith(f"**{group.title}**")
        row = group.rows[0]
        assert f"Command: `{row.command}`" in lead and f"machine: {row.machine};" in lead
        assert lead.endswith(f"date: {row.date}.")
        assert len(lines[0].split("|")) == 6  # shared by every row: no column for them
        assert [_cells(line)[0] for line in lines[2:]] == [r.what for r in group.rows]
    assert blocks[1][0].startswith("**GPU benchmark: Sinkhorn, loss, ResNet step, SwAV step** (*before the fused")
    assert "Fake GPU" in blocks[1][0] and "2031-01-02" in blocks[1][0] and "Fake GPU" not in blocks[2][0]
    for row in report.collect_rows(results):  # every row exactly once
        assert text.count(f"| {row.what} |") == 1, row.what
    assert report.markdown_report([]) == report.markdown_report(report.collect_groups(results / "none"))


def test_a_group_whose_rows_differ_shows_what_differs_per_row(report):
    rows = [report.Row("a", 1.0, 2.0, "s", "CPU (2 cores)", "2031-01-01", "python bench.py"),
            report.Row("b", 3.0, None, "s", "CPU (2 cores)", "2031-02-03", "python bench.py --quick")]
    group = report.Group("Mixed runs", "bench.json", rows)
    assert group.varying == ("command", "date")
    ((lead, lines),) = _blocks(report.markdown_report([group]))
    assert lead == "**Mixed runs**. Command: per row; machine: CPU (2 cores); date: per row."
    assert lines[0] == "| what | ours | peer | ours / peer | command | date |"
    assert _cells(lines[2]) == ["a", "1 s", "2 s", "0.5", "`python bench.py`", "2031-01-01"]
    assert _cells(lines[3]) == ["b", "3 s", "-", "-", "`python bench.py --quick`", "2031-02-03"]
    bar = report.Row("x | y", 1.0, 1.0, "s", "CPU", "2031-01-01", "python bench.py")
    ((_, lines),) = _blocks(report.markdown_report([report.Group("Bars", "bars.json", [bar])]))
    assert lines[2].startswith("| x \\| y |") and _cells(lines[2])[0] == "x | y"


def test_missing_files_are_skipped(report, tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    assert report.collect_rows(empty) == [] and report.collect_groups(empty) == []
    assert report.markdown_table([]).count("\n") == 1  # the header alone
    assert "|" not in report.markdown_report([])


def test_unknown_and_malformed_files_are_skipped_with_a_message(report, results):
    write(results / "something_else.json", {"x": 1})
    (results / "bench_loss.json").write_text("{not json", encoding="utf-8")
    messages = []
    rows = report.collect_rows(results, warn=messages.append)
    assert len(rows) == 5
    assert any("something_else.json" in m for m in messages)
    assert any("bench_loss.json" in m for m in messages)


def test_date_falls_back_to_the_file_date(report, results):
    sinkhorn = next(r for r in report.collect_rows(results) if r.what.startswith("Sinkhorn"))
    assert len(sinkhorn.date) == 10 and sinkhorn.date[4] == "-"


def test_date_is_the_commit_date_in_git_not_the_checkout_date(report, tmp_path):
    """A clone gives every file today's mtime; the date a result was committed does not move."""
    folder = tmp_path / "repo"
    folder.mkdir()
    path = write(folder / "bench_sinkhorn.json", {"results": []})
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder)]
    env = {"GIT_COMMITTER_DATE": "2030-05-06T12:00:00", "GIT_AUTHOR_DATE": "2030-05-06T12:00:00",
           "PATH": __import__("os").environ["PATH"], "HOME": str(tmp_path)}
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "a result"]):
        subprocess.run([*git, *args], check=True, env=env)
    assert report._date({}, path) == "2030-05-06"
    assert report._date({"metadata": {"date": "2031-01-01"}}, path) == "2031-01-01"  # a file's own date wins
    path.write_text(json.dumps({"results": [1]}), encoding="utf-8")  # re-measured, not yet committed: its own mtime
    stamp = __import__("datetime").datetime(2032, 7, 8, 12).timestamp()
    __import__("os").utime(path, (stamp, stamp))
    assert report._date({}, path) == "2032-07-08"


def _demo_results(swav, supervised, raw, n_test=None):
    metadata = {"seeds": list(range(len(swav))), "methods": ["swav"]}
    if n_test:
        metadata["test_images"] = n_test
    entry = lambda method, values: {"method": method, "seeds": len(values),
                                    "linear probe": {"values": values}, "kNN k=20": {"values": values}}
    return {"metrics": ["linear probe", "kNN k=20"], "metadata": metadata,
            "results": [entry("raw pixels", raw), entry("SwAV", swav), entry("supervised", supervised)]}


def test_accuracy_table_gives_mean_sd_and_the_per_seed_differences(report):
    # Seeds vary together: each mean ± sd is wide, the paired difference is exact.
    text = report.accuracy_table(_demo_results([0.90, 0.94, 0.98], [0.91, 0.95, 0.99], [0.9, 0.9, 0.9], n_test=400))
    lines = text.splitlines()
    assert lines[0] == "| method | linear probe | kNN k=20 |"
    assert "| SwAV (no labels) | 94.0 ± 4.0 | 94.0 ± 4.0 |" in lines
    assert "| raw pixels | 90.0 | 90.0 |" in lines  # the same for every seed: no ± 0.0
    assert "SwAV − supervised −1.0 ± 0.0; SwAV − raw pixels +4.0 ± 4.0." in text
    assert text.endswith("One test image is 0.25 points (400 test images).")


def test_write_replaces_each_digits_block_and_the_committed_tables_are_generated(report, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    write(results / "digits_results.json", _demo_results([0.9, 0.92], [0.95, 0.96], [0.9, 0.9]))
    start, end = report.digits_markers("digits_results.json")
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{report.START}\n{report.END}\n{start}\nold numbers\n{end}\noutro\n", encoding="utf-8")
    assert report.main(["--results-dir", str(results), "--write", "--targets", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "old numbers" not in text and "| SwAV (no labels) | 91.0 ± 1.4 |" in text and text.endswith("outro\n")
    # The README's and the course's tables are exactly what the committed results make.
    performance = report.markdown_report(report.collect_groups())
    for target in report.TARGETS:
        shown = target.read_text(encoding="utf-8").split(report.START)[1].split(report.END)[0].strip()
        assert shown == performance, f"{target.name}: run python benchmarks/report.py --write"
    blocks = report.digits_blocks()
    assert set(blocks) == set(report.DIGITS_TABLES)
    for target in report.TARGETS:
        shown = target.read_text(encoding="utf-8")
        for name, block in blocks.items():
            start, end = report.digits_markers(name)
            if start in shown:
                assert shown.split(start)[1].split(end)[0].strip() == block, (target.name, name)
    assert all(report.digits_markers(name)[0] in report.TARGETS[1].read_text(encoding="utf-8") for name in blocks)


def test_training_results_compare_with_supervised(report, results, tmp_path):
    training = write(tmp_path / "digits_results.json", {
        "metrics": ["linear probe"],
        "results": [
            {"method": "SwAV", "seeds": 2, "linear probe": {"mean": 0.9, "std": 0.01, "values": [0.89, 0.91]}},
            {"method": "supervised", "seeds": 2, "linear probe": {"mean": 0.96, "std": 0.0, "values": [0.96, 0.96]}},
        ],
        "metadata": {"seeds": [0, 1], "methods": ["swav"]},
    })
    rows = report.collect_rows(results, extra=[training])
    row = next(r for r in rows if "SwAV vs supervised" in r.what)
    assert row.ours == pytest.approx(90.0) and row.peer == pytest.approx(96.0)
    assert row.ratio == pytest.approx(0.9 / 0.96)
    assert row.command == "swav-ref demo --methods swav --seeds 0 1"


def test_marker_replacement_keeps_the_rest(report, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nbefore\n<!-- report:start -->\nold table\n<!-- report:end -->\nafter\n",
                    encoding="utf-8")
    assert report.write_block(page, "| new | table |")
    text = page.read_text(encoding="utf-8")
    assert text == "# Title\n\nbefore\n<!-- report:start -->\n| new | table |\n<!-- report:end -->\nafter\n"
    assert report.write_block(page, "| newer |")  # idempotent markers: a second write works
    assert "| new | table |" not in page.read_text(encoding="utf-8") and "| newer |" in page.read_text(encoding="utf-8")



#: A page as the docs hold them: UTF-8 text beyond ASCII (±, −, é) and \n line ends.
UTF8_PAGE = "# Résultats\n\n94.0 ± 4.0, −1.0\n<!-- report:start -->\nold\n<!-- report:end -->\nfin\n"

WRITE_IN_ANOTHER_LOCALE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("bench_report", sys.argv[1])
report = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = report
spec.loader.exec_module(report)
from pathlib import Path
assert report.write_block(Path(sys.argv[2]), "| new \\u00b1 table |")
"""


def test_pages_are_read_and_written_as_utf8_whatever_the_locale(tmp_path):
    """The docs and the README are UTF-8 with \\n line ends; read and written in the locale's
    encoding (cp1252 and \\r\\n on Windows, ASCII in a C locale) they failed to read or came
    back rewritten."""
    page = tmp_path / "page.md"
    page.write_bytes(UTF8_PAGE.encode("utf-8"))
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    result = subprocess.run([sys.executable, "-c", WRITE_IN_ANOTHER_LOCALE, str(ROOT / "benchmarks" / "report.py"),
                             str(page)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert page.read_bytes() == UTF8_PAGE.replace("old", "| new ± table |").encode("utf-8")


def test_file_without_markers_is_left_alone(report, tmp_path, capsys):
    page = tmp_path / "README.md"
    page.write_text("no markers here\n", encoding="utf-8")
    assert not report.write_block(page, "| x |")
    assert page.read_text(encoding="utf-8") == "no markers here\n"
    assert "marker" in capsys.readouterr().err
    with pytest.raises(ValueError, match="report:start"):
        report.replace_block("<!-- report:end --> <!-- report:start -->", "x")


def test_main_writes_every_target(report, results, tmp_path, capsys):
    page = tmp_path / "results.md"
    page.write_text("intro\n<!-- report:start -->\n<!-- report:end -->\noutro\n", encoding="utf-8")
    assert report.main(["--results-dir", str(results), "--training", "--write", "--targets", str(page)]) == 0
    out = capsys.readouterr().out
    assert "Sinkhorn, kernel domain" in out
    text = page.read_text(encoding="utf-8")
    assert text.startswith("intro\n<!-- report:start -->\n**Sinkhorn, ours vs POT (CPU)**. Command: ")
    assert text.endswith("<!-- report:end -->\noutro\n")
    assert "sinkhorn_case" in text and text.count("| what | ours | peer | ours / peer |") == 3


def test_gpu_results_take_the_machine_from_gpu_machine_txt(report, tmp_path):
    d = tmp_path / "gpu"
    d.mkdir()
    (d / "gpu_machine.txt").write_text("Fake H1, 1.0, 80 GiB\ncupy 0 torch 0\n", encoding="utf-8")
    write(d / "bench_resnet_cupy.json", {"backend": "cupy", "machine": "x86_64",
                                         "cases": {"resnet18": {"batch": 8, "input": [3, 32, 32],
                                                                "ours_step_s": 0.03, "torch_step_s": 0.01}}})
    write(d / "gpu_equivalence.json", {"steps": 3, "numpy_seconds": 4.0, "cupy_seconds": 1.0,
                                       "max_relative_difference": 1e-6})
    rows = report.collect_rows(d)
    assert [r.machine for r in rows] == ["Fake H1", "Fake H1"]
    resnet, equivalence = rows
    assert resnet.ratio == pytest.approx(3.0) and "--backend cupy" in resnet.command
    assert equivalence.ratio == pytest.approx(0.25)


def test_gpu_network_rows_say_how_each_side_computed(report, tmp_path):
    """A GPU step's row names its precision: as recorded by bench_resnet (and --tf32 in the
    command when TF32 was allowed), or, for files from before both sides were set alike,
    PyTorch's TF32 convolutions against our true float32."""
    case = {"resnet18": {"batch": 8, "input": [3, 32, 32], "ours_step_s": 0.03, "torch_step_s": 0.01}}
    for precision, command_ends in (("true float32 in both (TF32 off)", "--backend cupy"),
                                    ("TF32 allowed in both", "--backend cupy --tf32"), (None, "--backend cupy")):
        d = tmp_path / str(precision)
        d.mkdir()
        extra = {} if precision is None else {"precision": precision, "tf32": precision.startswith("TF32"),
                                              "fused_kernels": True}
        write(d / "bench_resnet_cupy.json", {"backend": "cupy", "cases": case, **extra})
        (row,) = report.collect_rows(d)
        assert f"torch CUDA, {precision or report.OLD_GPU_PRECISION}" in row.what and row.command.endswith(command_ends)
    d = tmp_path / "old_bench_gpu"
    d.mkdir()
    write(d / "bench_gpu.json", {"cases": {"resnet18_cifar_step_b256": {"ours_ms": 50.0, "torch_ms": 15.0},
                                           "sinkhorn_B4096_K3000": {"ours_ms": 1.0, "torch_ms": 0.5}}})
    network, sinkhorn = report.collect_rows(d)
    assert report.OLD_GPU_PRECISION in network.what and report.OLD_GPU_PRECISION not in sinkhorn.what


def test_a_step_ratio_is_the_one_the_benchmark_computed_not_that_of_its_rounded_times(report, tmp_path):
    """bench_resnet stored 0.023 s against 0.0037 s with the ratio 6.313 of the unrounded
    times; the table showed 0.023 / 0.0037 = 6.22. A file without the ratio divides."""
    case = {"batch": 8, "input": [1, 8, 8], "ours_step_s": 0.023, "torch_step_s": 0.0037}
    write(tmp_path / "bench_resnet.json", {"backend": "numpy", "cases": {"resnet_tiny": {
        **case, "ratio_ours_over_torch": 6.313}, "resnet18": case}})
    recorded, divided = report.collect_rows(tmp_path)
    assert recorded.ratio == 6.313 and divided.ratio == pytest.approx(0.023 / 0.0037)
    assert _cells(report.markdown_table([recorded]).splitlines()[2])[3] == "6.31"


@pytest.mark.slow
def test_bench_gpu_rehearsal_feeds_the_report(report, tmp_path):
    """benchmarks/bench_gpu.py at toy sizes on the CPU (NumPy against torch CPU), in the two
    runs gpu_check.sh makes (required cases, then probes): every case runs without error, the
    required ones come first, and report.py reads each one with its own description and peer,
    so that the one GPU run a session may get is not spent on a typo."""
    required.module("torch")
    out = tmp_path / "gpu"
    for group, name in (("required", "bench_gpu.json"), ("probes", "bench_gpu_probes.json")):
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--backend", "numpy", "--small",
                        "--cases", group, "--repeats", "1", "--out", str(out / name)],
                       check=True, capture_output=True, text=True, cwd=ROOT)
    data, probes = (json.loads((out / name).read_text(encoding="utf-8"))
                    for name in ("bench_gpu.json", "bench_gpu_probes.json"))
    for d in (data, probes):
        errors = {k: c["error"] for k, c in d["cases"].items() if "error" in c}
        assert not errors, errors
        assert d["finished"] and d["running"] is None and "torch" in d["versions"]
        assert d["command"].startswith("python benchmarks/bench_gpu.py --backend numpy --small --cases")
        assert "--out" not in d["command"] and "--out" in d["argv"]
    assert list(data["cases"])[:2] == ["resnet18_cifar_step_b8_fp32", "resnet18_cifar_step_b8_fp32_plain"]
    assert list(data["case_seconds"]) == ["resnet18_fp32", "swav_step", "sinkhorn", "loss", "resnet18_tf32"]
    assert {"sinkhorn_B64_K30", "swav_loss_fwd_bwd_B64_K30_2+6crops", "resnet18_cifar_step_b8_tf32",
            "swav_step_resnet18_2x32+6x16_b8"} <= set(data["cases"])
    assert {"resnet18_cifar_step_b8_profile", "resnet18_cifar_step_b2_host_floor", "launch_overhead_add",
            "launch_overhead_view", "bn_row_dot_C64_M8192", "resnet18_cifar_step_b8_graph_replay",
            "resnet18_cifar_step_b2_graph_replay"} == set(probes["cases"]) - {"resnet18_cifar_step_b2_host_floor_plain",
                                                                             "bn_row_dot_C512_M128"}
    assert probes["cases"]["resnet18_cifar_step_b8_graph_replay"]["eager_ms"] > 0
    profile_case = probes["cases"]["resnet18_cifar_step_b8_profile"]
    for key in ("profile_ms", "profile_plain_ms", "profile_tf32_ms"):
        profile = profile_case[key]
        assert {"im2col", "BatchNorm backward", "dX GEMM (in conv backward)", "optimiser step"} <= set(profile)
        assert min(profile.values()) > 0
    rows = report.collect_rows(out)
    assert len(rows) == len(data["cases"]) + len(probes["cases"])
    step = next(r for r in rows if r.what.startswith("full SwAV step, CIFAR-10 augmentation"))
    swav_case = data["cases"]["swav_step_resnet18_2x32+6x16_b8"]
    assert step.peer is not None and step.ratio == pytest.approx(swav_case["ratio"])
    assert all(r.ratio is not None and r.ratio > 0 for r in rows)


def _bench_gpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu

    return bench_gpu


def test_the_swav_step_benchmark_augments_as_cifar10_training_does():
    """bench_gpu's SwAV step uses CIFAR-10's recipe (flips, greyscale, CIFAR-10's mean and
    std, 2x32 + 6x16 crops), not the digits' or the general one."""
    from swav_ref.data.multicrop import CIFAR10_MEAN, default_config

    step = _bench_gpu().swav_step("numpy", 4, prototypes=4, hidden=8, feat_dim=4, arch="resnet_tiny")
    config = step.trainer.multicrop.config
    assert config == default_config("cifar10")
    assert config.n_crops == (2, 6) and config.sizes == (32, 16) and config.flip_p > 0 and config.grayscale_p > 0
    assert config.mean == CIFAR10_MEAN and step.trainer.mean == CIFAR10_MEAN


def test_bench_gpu_rehearsals_never_overwrite_the_committed_results(capsys):
    """A NumPy or --small run needs --out (the default path holds the H200's numbers); --small
    alone falls back to NumPy where CuPy is missing; probes go to a file of their own."""
    bench_gpu = _bench_gpu()
    for argv in (["--backend", "numpy"], ["--small"], ["--backend", "numpy", "--small", "--cases", "probes"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_gpu.parse_args(argv)
        assert exit_info.value.code == 2 and "needs --out" in capsys.readouterr().err
    args = bench_gpu.parse_args(["--small", "--out", "x.json"])
    assert args.backend == ("cupy" if bench_gpu._have_cupy() else "numpy") and args.out == Path("x.json")
    assert bench_gpu.parse_args(["--cases", "probes"]).out.name == "bench_gpu_probes.json"
    assert bench_gpu.parse_args([]).out == ROOT / "benchmarks" / "results" / "bench_gpu.json"


def test_gpu_equivalence_rehearses_on_numpy_and_records_its_command(report, tmp_path):
    """benchmarks/gpu_equivalence.py --backend numpy: NumPy against itself (trivially equal),
    the script's whole path on a CPU; the file records its command, which report.py shows.
    Without --out the rehearsal is refused (the default path holds the GPU result)."""
    script = ROOT / "benchmarks" / "gpu_equivalence.py"
    committed = (ROOT / "benchmarks" / "results" / "gpu_equivalence.json").read_bytes()
    refused = subprocess.run([sys.executable, str(script), "--backend", "numpy", "--steps", "1"],
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "give --out" in refused.stderr
    assert (ROOT / "benchmarks" / "results" / "gpu_equivalence.json").read_bytes() == committed
    out = tmp_path / "gpu_equivalence_plain.json"
    env = {**os.environ, "SWAV_REF_FUSED": "0"}
    subprocess.run([sys.executable, str(script), "--backend", "numpy", "--steps", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["passed"] and data["max_relative_difference"] == 0.0 and len(data["cupy"]) == 2
    assert data["command"] == "SWAV_REF_FUSED=0 python benchmarks/gpu_equivalence.py --backend numpy --steps 2"
    assert data["fused_kernels"] is False and data["versions"]["numpy"]
    (row,) = report.collect_rows(tmp_path)
    assert row.command == data["command"] and "plain CuPy code" in row.what


def test_equivalence_rows_name_the_command_that_made_them(report, tmp_path, capsys):
    """Files without a recorded command: the plain-code run says SWAV_REF_FUSED=0; a recorded
    command and machine win; a failed comparison gives no row but a message."""
    cases = {"gpu_equivalence.json": ({"fused_kernels": True}, "python benchmarks/gpu_equivalence.py"),
             "gpu_equivalence_plain.json": ({"fused_kernels": False},
                                            "SWAV_REF_FUSED=0 python benchmarks/gpu_equivalence.py")}
    for name, (extra, command) in cases.items():
        d = tmp_path / name
        d.mkdir()
        write(d / name, {"steps": 20, "numpy_seconds": 4.0, "cupy_seconds": 2.0, "max_relative_difference": 1e-5,
                         **extra})
        (row,) = report.collect_rows(d)
        assert row.command == command
        write(d / name, {"steps": 20, "numpy_seconds": 4.0, "cupy_seconds": 2.0, "max_relative_difference": 1e-5,
                         "command": "python benchmarks/gpu_equivalence.py --steps 20", "machine": "Fake H9", **extra})
        (row,) = report.collect_rows(d)
        assert row.command == "python benchmarks/gpu_equivalence.py --steps 20" and row.machine == "Fake H9"
        write(d / name, {"steps": 20, "error": "BackendUnavailableError: no GPU", **extra})
        assert report.collect_rows(d) == []
        assert "no GPU" in capsys.readouterr().err


def test_write_refuses_to_rebuild_the_committed_tables_from_another_folder(report, results, capsys):
    """`report.py --results-dir $OUT --write` would rebuild README.md's and docs/results.md's
    tables from a GPU run's files alone and drop every CPU row: refused, with what to do."""
    before = [t.read_text(encoding="utf-8") for t in report.TARGETS]
    assert report.main(["--results-dir", str(results), "--write"]) == 2
    err = capsys.readouterr().err
    assert "drop every row" in err and "Copy the new result files into" in err
    assert [t.read_text(encoding="utf-8") for t in report.TARGETS] == before
    assert report.refuse_partial_write(report.RESULTS, report.TARGETS) is None
    assert report.refuse_partial_write(results, [results / "page.md"]) is None  # a page of one's own: allowed


def test_launch_counts_show_the_fused_path_and_feed_the_report(report, tmp_path):
    """benchmarks/bench_launches.py on the resnet_tiny step: the fused kernels (compiled for
    the CPU) must cut the kernel launches of a step to under a third of the plain code's.
    A fused path that silently falls back to the plain code (a layout or dtype that no
    longer qualifies) shows up here as a higher count."""
    required.need_compiler()
    out = tmp_path / "launches" / "bench_launches.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_launches.py"), "--cases", "resnet_tiny_step",
                    "--out", str(out)], check=True, capture_output=True, text=True, cwd=ROOT)
    case = json.loads(out.read_text(encoding="utf-8"))["cases"]["resnet_tiny_step"]
    plain, fused = case["plain"], case["fused"]
    assert plain["kernels"] > 500 and 0 < fused["kernels"] < plain["kernels"] / 3
    assert fused["views"] < plain["views"]
    launched = {site["what"] for site in case["top_kernel_sites_fused"]}
    assert {"fused sgd_update", "fused im2col", "fused batchnorm_scale_shift"} <= launched
    (row,) = report.collect_rows(out.parent)
    assert row.unit == "launches" and row.ours == fused["kernels"] and row.ratio == pytest.approx(case["ratio"])
    assert report.format_value(1606, row.unit) == "1,606 launches"


def test_the_host_time_case_issues_exactly_resnet18s_operations():
    """bench_host.py times a narrow resnet18 as a stand-in for resnet18's host work: that
    holds only if it issues the same operations, on the fused path and on the plain code."""
    required.need_compiler()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    import bench_launches

    for use_fused in (False, True):
        full, narrow = (bench_launches.count_step(bench_launches.resnet_step(arch), use_fused)
                        for arch in ("resnet18", "resnet18_narrow"))
        for kind in ("kernels", "views", "allocations", "host_syncs"):
            assert full[kind] == narrow[kind], (use_fused, kind)


def test_host_times_feed_the_report(report, tmp_path):
    d = tmp_path / "host"
    d.mkdir()
    write(d / "bench_host.json", {"machine": "x86_64", "date": "2026-11-28", "sides": {
        "ours_plain": {"step_ms": 30.0}, "ours_fused_issue_only": {"step_ms": 12.0}, "torch": {"step_ms": 15.0}}})
    plain, fused = report.collect_rows(d)
    assert "ours (plain code) vs torch CPU" in plain.what and plain.ratio == pytest.approx(2.0)
    assert "launches issued only" in fused.what and fused.ratio == pytest.approx(0.8) and fused.unit == "s"
    write(d / "bench_host.json", {"sides": {"ours_plain": {"step_ms": 30.0}}})  # no torch: no row
    assert report.collect_rows(d) == []


def test_failed_gpu_cases_are_reported_not_tabled(report, tmp_path, capsys):
    d = tmp_path / "gpu"
    d.mkdir()
    write(d / "bench_gpu.json", {"machine": "Fake GPU", "fused_kernels": True, "cases": {
        "resnet18": {"error": "RuntimeError: boom"},
        "sinkhorn_x": {"what": "Sinkhorn x: fused vs plain", "ours_ms": 1.0, "peer_ms": 4.0}}})
    rows = report.collect_rows(d)
    assert [r.what for r in rows] == ["Sinkhorn x: fused vs plain"] and rows[0].ratio == pytest.approx(0.25)
    assert "resnet18 failed: RuntimeError: boom" in capsys.readouterr().err


def test_a_gpu_case_the_library_cannot_run_is_tabled_as_such(report, tmp_path, capsys):
    """A case recorded ``unavailable`` (CuPy refuses cuBLAS during a CUDA graph capture)
    is a row that says why, with no numbers, and not a failure on stderr."""
    d = tmp_path / "gpu"
    d.mkdir()
    write(d / "bench_gpu_probes.json", {"machine": "Fake GPU", "fused_kernels": True, "cases": {
        "resnet18_cifar_step_b256_graph_replay": {"what": "step from a CUDA graph: not measurable here (no cuBLAS)",
                                                  "unavailable": "no cuBLAS"}}})
    rows = report.collect_rows(d)
    assert [(r.what, r.ours, r.peer, r.ratio) for r in rows] == [
        ("step from a CUDA graph: not measurable here (no cuBLAS)", None, None, None)]
    assert "failed" not in capsys.readouterr().err
    assert "not measurable here" in report.markdown_report(report.collect_groups(d))


def test_a_refused_graph_capture_is_recorded_as_unavailable_not_as_an_error(monkeypatch):
    """bench_gpu's graph probe on a library that refuses a call during capture (CuPy's
    cuBLAS, imitated here by a fake CUDA stream): the capture is left and the refusal
    raised as CaptureUnsupported, which the probe records as unavailable."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_gpu

    class Stream:
        def __init__(self, non_blocking):
            self.capturing = False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def synchronize(self):
            pass

        def begin_capture(self):
            self.capturing = True

        def end_capture(self):
            self.capturing = False

    def step():
        if stream_made[-1].capturing:
            raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")

    stream_made = []

    def make_stream(non_blocking):
        stream_made.append(Stream(non_blocking))
        return stream_made[-1]

    xp = type("xp", (), {"cuda": type("cuda", (), {"Stream": staticmethod(make_stream)})})
    setup = type("Setup", (), {"device": "cuda", "xp": xp, "sync": staticmethod(lambda: None)})()
    with pytest.raises(bench_gpu.CaptureUnsupported, match="cuBLAS"):
        bench_gpu.replayable(setup, step)
    assert not stream_made[-1].capturing  # capture mode was left


def test_the_graph_probe_records_a_refused_capture_and_goes_on(monkeypatch):
    """bench_graph_replay, at the rehearsal's sizes on the CPU, with a capture that the
    library refuses: each batch's case is recorded unavailable, with the library's words,
    and no exception ends the probe (which would have recorded it as a failure)."""
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_gpu

    def refuse(setup, step):
        raise bench_gpu.CaptureUnsupported("calling cuBLAS API during stream capture is currently unsupported")

    monkeypatch.setattr(bench_gpu, "replayable", refuse)
    size = bench_gpu.SIZES["small"]
    out = bench_gpu.bench_graph_replay(bench_gpu.make_setup("numpy", torch), size, 1)
    assert sorted(out) == sorted(f"resnet18_cifar_step_b{b}_graph_replay" for b in (size["images"], size["floor_images"]))
    for case in out.values():
        assert case["unavailable"].startswith("calling cuBLAS API") and "not measurable here" in case["what"]
        assert "ours_ms" not in case


def test_gpu_rows_written_before_the_fused_kernels_say_so(report, results):
    """Files without a ``fused_kernels`` field predate swav_ref.fused (the next GPU check
    replaces them); their rows carry the mark, CPU rows never do."""
    rows = report.collect_rows(results)
    gpu = next(r for r in rows if r.what.startswith("sinkhorn_case"))
    assert gpu.what.endswith("(before the fused kernels)")
    assert not any("fused" in r.what for r in rows if r.machine != "Fake GPU")
    # Each row keeps its mark in its table; a group made only of such rows says so in its lead-in.
    text = report.markdown_report(report.collect_groups(results))
    assert text.count("(before the fused kernels) |") == 2 and text.count("(*before the fused kernels*)") == 1
    mixed = report.Group("Mixed", "x.json", [gpu, next(r for r in rows if r.what.startswith("Sinkhorn"))])
    assert "*before the fused kernels*" not in report.lead_in(mixed)


def test_gpu_check_script_calls_scripts_and_options_that_exist():
    """benchmarks/gpu_check.sh runs once per GPU session: its shell must parse, and every
    benchmark and CLI command it calls must exist and accept the options it is given
    (checked with --help)."""
    import re
    import shutil

    script = ROOT / "benchmarks" / "gpu_check.sh"
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text(encoding="utf-8")
    calls = re.findall(r"python3 (benchmarks/\w+\.py)((?:\\\n|[^\n])*)", text)  # with continued lines
    assert {c[0] for c in calls} >= {"benchmarks/bench_gpu.py", "benchmarks/gpu_equivalence.py",
                                     "benchmarks/bench_resnet.py", "benchmarks/bench_loss.py"}
    cli = re.findall(r"python3 -m (swav_ref \w+)((?:\\\n|[^\n])*)", text)
    assert {c[0] for c in cli} == {"swav_ref train", "swav_ref eval"}
    for path, rest in calls + cli:
        program = [str(ROOT / path)] if path.endswith(".py") else ["-m", *path.split()]
        help_text = subprocess.run([sys.executable, *program, "--help"], capture_output=True, text=True,
                                   cwd=ROOT, check=True).stdout
        for option in re.findall(r"(--[a-z][a-z-]*)", rest):
            assert option in help_text, f"{path} has no option {option}"


def test_gpu_check_puts_what_the_issue_needs_first_within_its_budget():
    """The steps that give the numbers the GPU check exists for come first, and their caps
    add up to less than the default budget, itself under 8 minutes: they come back even if
    each runs to its cap."""
    import re

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text(encoding="utf-8")
    budget = int(re.search(r'TOTAL_SECONDS="\$\{TOTAL_SECONDS:-(\d+)\}"', text).group(1))
    found = re.findall(r"^\s*(?:if )?step (\w+) (\d+) ", text, re.M)
    steps = list({name: int(cap) for name, cap in found}.items())  # the machine step has a CPU variant
    first = ["machine", "bench_required", "equivalence", "equivalence_plain", "tests"]
    assert [name for name, _ in steps[:5]] == first
    assert sum(cap for _, cap in steps[:5]) <= budget - 30 and budget <= 8 * 60 - 30
    assert "bench_probes" in dict(steps) and "e2e_train" in dict(steps)


def test_gpu_check_records_its_steps_even_when_the_budget_is_spent(tmp_path):
    """With no budget every step is skipped, and gpu_check.json still records each one, with
    its command and why it did not run: the record's plumbing, in seconds (the rehearsal with
    a budget, GPU_CHECK_BACKEND=numpy, runs every step on the CPU in about 3 minutes)."""
    import shutil

    if not shutil.which("bash") or not shutil.which("timeout"):
        pytest.skip("needs bash and coreutils' timeout")
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_BACKEND": "numpy", "OUT": str(out), "TOTAL_SECONDS": "0"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert record["finished"] and record["backend"] == "numpy" and record["running"] is None
    steps = {s["name"]: s for s in record["steps"]}
    assert all(s["status"] == "skipped" and s["exit_code"] is None for s in steps.values())
    assert "budget spent" in steps["tests"]["reason"] and steps["e2e_resume"]["reason"] == "e2e_train did not succeed"
    assert steps["bench_required"]["command"].startswith("python3 benchmarks/bench_gpu.py --cases required")
    # the device tool brings back at most 8 files from $OUT: the rest travels packed
    import tarfile

    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8, sorted(out.rglob("*"))
    with tarfile.open(out / "gpu_check.tgz") as packed:
        assert "./gpu_check.json" in packed.getnames()
    refused = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "GPU_CHECK_BACKEND": "numpy", "OUT": ""})
    assert refused.returncode == 2 and "rehearsal" in refused.stderr


def test_thread_rows_compare_one_thread_with_the_default_per_condition(report, tmp_path):
    d = tmp_path / "threads"
    d.mkdir()
    write(d / "bench_threads.json", {
        "what": "SwAV on digits, 2 epochs", "default_blas_threads": 2, "machine": "x86_64 (2 cores)",
        "date": "2031-01-02", "conditions": {"quiet": {"one_thread_s": 3.0, "default_s": 2.5},
                                             "one core busy": {"one_thread_s": 3.5, "default_s": 7.0}}})
    quiet, busy = report.collect_rows(d)
    assert quiet.what == "SwAV on digits, 2 epochs, quiet: --threads 1 vs the BLAS default (2 threads)"
    assert quiet.ratio == pytest.approx(1.2) and busy.ratio == pytest.approx(0.5)
    assert busy.command == "python benchmarks/bench_threads.py"


def test_knn_rows_compare_ours_with_scikit_learn_and_with_the_full_sort(report, tmp_path):
    d = tmp_path / "knn"
    d.mkdir()
    write(d / "bench_knn.json", {
        "what": "kNN evaluation, 50,000 training points", "machine": "x86_64 (2 cores)", "date": "2031-01-02",
        "cases": {"k=20": {"ours_s": 2.0, "full_sort_s": 8.0, "sklearn_search_s": 4.0,
                           "same_predictions_as_full_sort": True}}})
    sklearn, full_sort = report.collect_rows(d)
    assert sklearn.what == ("kNN evaluation, 50,000 training points, k=20: ours vs scikit-learn's brute-force "
                            "cosine search (search only)")
    assert sklearn.ratio == pytest.approx(0.5) and full_sort.ratio == pytest.approx(0.25)
    assert full_sort.command == "python benchmarks/bench_knn.py"
