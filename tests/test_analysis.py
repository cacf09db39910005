"""The analysis on a store filled with hand-logged runs of known values."""

from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest

from analysis import queries, report, tables
from analysis.queries import _ran_variants
from benchmarks.fake_runs import epoch, log_run, log_study
from tests.conftest import one_message


@pytest.fixture
def study(client):
    return log_study(client)


def test_c2_table_has_the_warm_up_then_each_epoch_then_totals_and_means(study):
    c2 = tables.c2_epochs(queries.exercise("C2"))
    assert list(c2["epoch"]) == ["warm-up", 1, 2, "total", "mean", "median"]
    assert c2["total s"].iloc[0] == pytest.approx(3.1)  # its own line, in no epoch or total
    assert c2.iloc[0][["data-loading s", "training s", "loss", "accuracy %"]].isna().all()
    epochs = c2.iloc[1:]
    assert list(epochs["data-loading s"]) == pytest.approx([0.2, 0.2, 0.4, 0.2, 0.2])
    assert list(epochs["training s"]) == pytest.approx([14.0, 13.0, 27.0, 13.5, 13.5])
    assert list(epochs["total s"]) == pytest.approx([14.5, 13.5, 28.0, 14.0, 14.0])
    assert epochs["accuracy %"].iloc[:2].tolist() == pytest.approx([45.0, 65.0])
    assert pd.isna(epochs["accuracy %"].iloc[2])
    assert epochs["accuracy %"].iloc[3] == pytest.approx(55.0)


def test_c3_sorts_counts_marks_the_best_and_c4_compares_one_worker_with_it(study):
    c3 = tables.c3_workers(queries.exercise("C3"))
    assert list(c3["workers"]) == [0, 1, 4, 8]
    assert list(c3["data-loading s"]) == pytest.approx([11.6, 5.9, 0.97, 0.90])
    assert list(c3["best"]) == ["", "", "", "yes"] and tables.best_workers(c3) == 8
    c4 = tables.c4_one_vs_best(c3)
    assert list(c4["workers"]) == ["1", "8 (best, shortest epoch)"]
    assert list(c4["computing s"]) == pytest.approx([4.0, 4.0])
    assert list(c4["waiting %"]) == pytest.approx([100 * 5.9 / 10.4, 100 * 0.90 / 5.4])
    text = tables.c4_explanation(c3, "16")
    assert "5.90 s" in text and "56.7%" in text and "0.90 s" in text and "16 CPUs" in text
    assert "stops being the bottleneck" in text


def test_c5_marks_the_estimated_cpu_epoch_and_computes_the_speedup(study):
    c5 = tables.c5_devices(queries.exercise("C5"))
    assert list(c5["device"]) == ["cpu", "cuda"]
    assert list(c5["estimated"]) == ["estimated", ""]
    assert list(c5["avg epoch s"]) == pytest.approx([200.0, 5.0])
    assert list(c5["training s"]) == pytest.approx([180.0, 3.9])  # 9 s scaled by 200/10
    assert list(c5["speedup vs cpu"]) == pytest.approx([1.0, 40.0])


def test_c5_scaling_compares_steady_epochs_with_one_gpu_per_mode(study):
    section = report.section("C5-scaling", queries.exercise("C5-scaling"))
    c5 = section.tables["c5_scaling"]
    assert list(zip(c5["scaling"], c5["GPUs"], c5["batch/GPU"], strict=True)) == [
        ("–", 1, 128), ("weak", 2, 128), ("weak", 4, 128), ("strong", 2, 64), ("strong", 4, 32),
    ]  # fmt: skip
    assert list(c5["epoch s"]) == pytest.approx([5.0, 2.6, 1.4, 2.8, 1.75])  # epoch 1 left out
    assert list(c5["images/s"]) == [10_000, 19_231, 35_714, 17_857, 28_571]
    assert list(c5["efficiency %"]) == pytest.approx([100.0, 96.15, 89.29, 89.29, 71.43], abs=1e-2)
    assert pd.isna(c5["comm s"][0]) and list(c5["comm s"][1:]) == pytest.approx([0.1] * 4)
    assert report.headline(section) == pytest.approx(
        {"weak_scaling_efficiency": 0.8929, "strong_scaling_efficiency": 0.7143}, abs=1e-4
    )
    assert "c5_scaling" in section.figures


def test_c6_has_average_training_time_and_loss_and_accuracy_per_epoch(study):
    ex = queries.exercise("C6")
    c6 = tables.c6_optimizers(ex)
    assert list(c6["optimizer"]) == ["sgd", "adam"]
    assert list(c6["training s/epoch"]) == pytest.approx([5.0, 5.0])  # the median, and its range
    assert list(c6["training s/epoch min"]) == [4.0, 4.0]
    assert list(c6["training s/epoch max"]) == [6.0, 6.0]
    assert list(c6["final accuracy %"]) == pytest.approx([72.0, 31.0])
    accuracy = tables.c6_per_epoch(ex, "train_acc")
    assert list(accuracy.columns) == ["optimizer", "accuracy 1 %", "accuracy 2 %"]
    assert accuracy.iloc[:, 1:].to_numpy().ravel().tolist() == pytest.approx(
        [62.0, 72.0, 21.0, 31.0]
    )
    loss = tables.c6_per_epoch(ex, "train_loss")
    assert list(loss["loss 1"]) == pytest.approx([1.6, 1.6])


def test_c7_averages_over_epochs_and_keeps_the_final_epoch(study):
    c7 = tables.c7_batch_norm(queries.exercise("C7"))
    assert list(c7["model"]) == ["no BN", "BN"]
    assert list(c7["avg accuracy %"]) == pytest.approx([51.0, 62.0])
    assert list(c7["final accuracy %"]) == pytest.approx([61.0, 72.0])
    assert list(c7["avg loss"]) == pytest.approx([1.3, 1.3])


def test_q1_q4_answers_come_from_the_inspect_run(study):
    q = tables.q1_q4_answers(queries.answers(queries.exercise("Q1-Q4")))
    answers = dict(zip(q["quantity"], q["value"], strict=True))
    assert answers["convolutional layers"] == 20  # numbers, not text
    assert answers["input dimension of the last linear layer"] == 512
    assert answers["adam: optimizer state elements"] == 22_347_986
    assert answers["sgd: keeps momentum_buffer"] == 11_173_962
    # the MiB from the exact bytes (rounded once when shown: 42.63, never 42.625 then 42.62)
    assert answers["sgd: optimizer state MiB"] == pytest.approx(11_173_962 * 4 / 2**20)
    assert {"adam: keeps exp_avg", "adam: keeps exp_avg_sq"} <= set(answers)


def test_a_store_copied_without_its_artifacts_reports_q1_q4_missing_not_a_traceback(client, study):
    # Given the inspect run's answers.json gone (a store copied without ./mlartifacts)
    uri = client.get_run(study["Q1-Q4"]).info.artifact_uri
    (Path(urlparse(uri).path) / "answers.json").unlink()
    # when its section is built
    section = report.section("Q1-Q4", queries.exercise("Q1-Q4"))
    # then it says what is missing, and the reference's figures still stand beside
    assert "q1_q4" not in section.tables and "q1_q4_reference" in section.tables
    assert f"inspect run {study['Q1-Q4']} has no readable answers.json" in section.text


def test_only_finished_runs_count_and_the_newest_child_per_variant_wins(client, study):
    parent = study["C6"]
    experiment = client.get_run(parent).info.experiment_id
    log_run(client, experiment, command="compare-optim", exercise="C6", status="RUNNING",
            parent_id=parent, variant="optimizer=sgd", params={"optimizer": "sgd"},
            epochs=[{"train_time_s": 99.0}])  # fmt: skip
    newer = log_run(
        client, experiment, command="compare-optim", exercise="C6", parent_id=parent,
        variant="optimizer=adam", params={"optimizer": "adam"},
        epochs=[{"train_time_s": 1.0, "train_loss": 1.0, "train_acc": 0.9}],
    )  # fmt: skip
    ex = queries.exercise("C6")
    assert sorted(ex.runs["tags.cifarexp.variant"]) == ["optimizer=adam", "optimizer=sgd"]
    assert newer in ex.run_ids
    assert 99.0 not in set(ex.epochs["train_time_s"])
    # a RUNNING top-level run (its process killed) is not a result either
    log_run(client, experiment, command="compare-optim", exercise="C6", status="RUNNING")
    assert queries.exercise("C6").parent_id == parent


def test_report_writes_every_item_in_study_order_with_csvs_and_plots(study, tmp_path):
    sections = report.build_report()
    items = ["C2", "C3", "C5", "C5-scaling", "C6", "C7", "Q1-Q4", "profiles"]
    assert [s.item for s in sections] == items
    path = report.write_report(sections, tmp_path / "out", "sqlite:///x.db")
    text = path.read_text()
    assert text.index("C1, C2") < text.index("C3, C4") < text.index("C7") < text.index("Q1-Q4")
    assert "Synthetic data" in text and study["C3"] in text and "Fake GPU" in text
    assert "settings: " not in text and "workers=2" in text  # the C2 run's settings
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"c2_epochs.csv", "c3_workers.csv", "c4_one_vs_best.csv", "c5_devices.csv",
            "c5_scaling.csv", "c6_optimizers.csv", "c6_accuracy.csv", "c6_loss.csv",
            "c7_batch_norm.csv", "q1_q4.csv"} <= files  # fmt: skip
    assert {"c3_workers.png", "c5_devices.png", "c6_optimizers.png", "c7_batch_norm.png"} <= files
    assert pd.read_csv(tmp_path / "out" / "c3_workers.csv")["workers"].tolist() == [0, 1, 4, 8]
    # report.html: the same report as MLflow's artifact view shows it, the plots inlined
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len([f for f in files if ".png" in f])
    assert "<table" in html and "final accuracy %" in html and "](" not in html


def test_every_csv_column_says_its_unit_and_holds_numbers_in_it(study, tmp_path):
    report.write_report(report.build_report(), tmp_path / "out", "sqlite:///x.db")
    for path in (tmp_path / "out").glob("*.csv"):
        table = pd.read_csv(path)
        for column in table.columns:
            if any(word in column for word in ("accuracy", "waiting", "efficiency", "wait")):
                # a share or an accuracy is a percentage, in a column that says so
                assert column.endswith(" %"), (path.name, column)
                values = pd.to_numeric(table[column], errors="coerce").dropna()
                assert values.max() > 1, (path.name, column, list(values))
    q = pd.read_csv(tmp_path / "out" / "q1_q4.csv")
    assert pd.api.types.is_numeric_dtype(q["value"])  # 11173962, not "11,173,962"
    values = dict(zip(q["quantity"], q["value"], strict=True))
    assert values["sgd: keeps momentum_buffer"] == 11_173_962
    text = (tmp_path / "out" / "q1_q4.csv").read_text()
    assert ",11173962\n" in text and ",20\n" in text and "11173962.0" not in text
    c6 = pd.read_csv(tmp_path / "out" / "c6_optimizers.csv")
    assert list(c6["final accuracy %"]) == pytest.approx([72.0, 31.0])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "final accuracy % |" in markdown
    assert "11,173,962" in markdown and "| 72.0 |" in markdown


def test_numbers_are_rounded_once_the_same_in_csv_and_mlflow_table():
    from cifarexp.tracking.tabular import csv_text, round_number, rounded

    assert round_number(79.6904556056) == 79.6905
    assert round_number(11_173_962.0) == 11_173_962  # a count keeps all its digits
    assert round_number(0.0036512345) == 0.00365123
    counts = pd.Series([11_173_962], dtype=object)
    table = rounded(pd.DataFrame({"s": [79.6904556056], "n": counts}))
    assert csv_text(table).splitlines() == ["s,n", "79.6905,11173962"]
    mixed = pd.DataFrame({"value": pd.Series([20, 42.62538528442383], dtype=object)})
    assert csv_text(mixed).splitlines() == ["value", "20", "42.6254"]


def _profiled(client, experiment, workers, split, bound, **params):
    metrics = {f"profile_{part}_share": share for part, share in split.items()}
    return log_run(
        client, experiment, command="time", exercise="C2", params={"workers": workers, **params},
        metrics={**metrics, "profile_s": 1.5}, tags={"cifarexp.verdict": f"{bound}: because"},
    )  # fmt: skip


def test_the_profiles_show_each_kind_of_run_newest_first_as_a_stacked_bar(client, tmp_path):
    # Given profiled runs of the study's path with 0 workers (twice), 8, and the fast path
    e = client.create_experiment("time")
    gpu = {"data_wait": 0.6, "host": 0.15, "copy": 0.05, "compute": 0.2}
    _profiled(client, e, 0, {**gpu, "data_wait": 0.5, "host": 0.25}, "input-bound")  # older
    ids = [
        _profiled(client, e, 0, gpu, "input-bound"),
        _profiled(client, e, 8, {**gpu, "data_wait": 0.05, "host": 0.7}, "host-launch-bound"),
        _profiled(client, e, 0, {**gpu, "data_wait": 0.0, "host": 0.1, "compute": 0.85},
                  "compute-bound", loader="gpu", precision="bf16", compile="reduce-overhead",
                  cuda_graph="False", channels_last="True"),
    ]  # fmt: skip
    log_run(client, e, command="time", exercise="C2")  # not profiled
    # When the report's section is built
    section = report.profiles_section()
    # Then each kind of run has a row, oldest first, the newest of a kind winning
    table = section.tables["profiles"]
    assert list(table["run"]) == [
        "workers=0", "workers=8", "loader=gpu, bf16, compile reduce-overhead, channels-last",
    ]  # fmt: skip
    assert list(table["bound"]) == ["input-bound", "host-launch-bound", "compute-bound"]
    assert list(table["data wait %"]) == pytest.approx([60.0, 5.0, 0.0])
    assert list(table.columns[3:]) == [
        "data wait %", "host, device idle %", "copies %", "compute %", "profile s"
    ]  # fmt: skip
    assert "- workers=8: host-launch-bound: because." in section.text
    assert all(run_id in section.source for run_id in ids)
    # and a stacked bar per run: one bar per part and run, each run's adding up to 100%
    [ax] = section.figures["profiles"].axes
    widths = [[bar.get_width() for bar in bars] for bars in ax.containers]
    assert len(widths) == 4 and all(len(w) == 3 for w in widths)
    assert [sum(run) for run in zip(*widths, strict=True)] == pytest.approx([100, 100, 100])
    report.write_report([section], tmp_path, "sqlite:///x.db")
    assert {"profiles.csv", "profiles.png"} <= {p.name for p in tmp_path.iterdir()}


def test_report_cli_names_missing_items_with_the_command_to_run(cli, client, tmp_path):
    log_run(
        client, client.create_experiment("t"), command="time", exercise="C2",
        epochs=[{"data_time_s": 1, "train_time_s": 2, "epoch_time_s": 3, "train_loss": 1,
                 "train_acc": 0.5}],
    )  # fmt: skip
    result = cli("report", "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    assert "not run yet; run `cifarexp sweep-workers`" in result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Produce it with `cifarexp inspect`" in text and "C1, C2" in text
    [report_run] = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("cifarexp.command") == "report"
    ]
    assert report_run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(report_run.info.run_id)}
    assert {"report.md", "report.html"} <= logged  # the HTML: what MLflow's artifact view shows
    note = report_run.data.tags["mlflow.note.content"]  # the report run's description
    assert "An epoch took 3.00 s on average" in note
    assert "not run yet; run `cifarexp sweep-workers`" in note


def test_report_runs_option_picks_runs_and_rejects_malformed_pairs(cli, client, study, tmp_path):
    # Given a newer study beside the first, when the report picks the first's C6,
    newer = log_study(client)
    result = cli("report", "--out", str(tmp_path / "r"), "--runs", f"C6={study['C6']}")
    assert result.exit_code == 0, result.output
    # then its C6 comes from the run picked, the other items from the newer study.
    text = (tmp_path / "r" / "report.md").read_text()
    assert study["C6"] in text and newer["C6"] not in text and newer["C2"] in text
    result = cli("report", "--runs", "C9=abc")
    assert result.exit_code == 2 and "--runs" in result.output


@pytest.mark.parametrize(
    ("pick", "message"),
    [
        (lambda ids, killed: f"C3={ids['C6']}", "is a C6 run, not C3"),
        (lambda ids, killed: f"C2={killed}", "is KILLED"),
        (lambda ids, killed: "C2=' or 1=1 or run_id='", "is not a run id"),
    ],
)
def test_report_runs_takes_finished_runs_of_their_item_only(cli, client, study, pick, message):
    experiment = client.get_run(study["C2"]).info.experiment_id
    killed = log_run(client, experiment, command="time", exercise="C2", status="KILLED")
    result = cli("report", "--runs", pick(study, killed))
    assert result.exit_code == 2, result.output
    assert message in one_message(result.output) and "--runs" in result.output


def test_the_report_escapes_what_users_and_the_store_wrote(study, tmp_path):
    uri = "sqlite:///x.db`\n## INJECTED [link](http://evil) | cell"
    text = report.write_report(report.build_report(), tmp_path / "out", uri).read_text()
    assert not any(line.startswith("## INJECTED") for line in text.splitlines())
    assert "\\#\\# INJECTED \\[link\\](http://evil) \\| cell" in text


def sweep_table(times: dict[int, tuple[float, float, float]]) -> pd.DataFrame:
    """C3 of a hand-made sweep: workers -> (data-loading, training, total) seconds."""
    runs = pd.DataFrame(
        {"run_id": [f"r{w}" for w in times], "params.workers": [str(w) for w in times],
         "params.loader": "torch"}
    )  # fmt: skip
    epochs = pd.DataFrame(
        [
            {"run_id": f"r{w}", "variant": f"workers={w}", "epoch": 1, "data_time_s": d,
             "train_time_s": t, "epoch_time_s": total}
            for w, (d, t, total) in times.items()
        ]
    )  # fmt: skip
    return tables.c3_workers(queries.Exercise("C3", pd.Series(dtype=object), runs, epochs))


def test_c3_ties_within_noise_go_to_the_smaller_count_and_c4_says_why_0_is_best():
    # this 2-CPU machine: 1 worker waits 7 ms less than 0 (noise), its epoch is 1.6 s longer
    c3 = sweep_table({1: (0.055, 8.7, 8.85), 0: (0.062, 7.1, 7.24), 4: (0.060, 9.0, 9.2)})
    assert tables.best_workers(c3) == 0
    c4 = tables.c4_one_vs_best(c3)
    assert list(c4["workers"]) == ["1", "0 (best, shortest epoch)"]
    text = tables.c4_explanation(c3, "2")
    assert "With 0 workers, each batch loaded in the main process" in text and "0.06 s" in text
    assert "one worker already prepares" not in text.lower() and "Yet" not in text


def test_c4_explains_1_best_as_the_next_batch_prepared_during_the_step():
    c3 = sweep_table({1: (0.20, 4.0, 4.3), 0: (3.0, 4.0, 7.1), 4: (0.199, 4.0, 4.3)})
    assert tables.best_workers(c3) == 1
    assert list(tables.c4_one_vs_best(c3)["workers"]) == ["1 (best, shortest epoch)"]
    text = tables.c4_explanation(c3, "16")
    assert "More workers did not cut the wait" in text and "prepares the next batch" in text


def test_c4_explains_a_plateau_and_a_cpu_bottleneck():
    plateau = sweep_table({1: (5.9, 4.0, 10.4), 0: (11.6, 4.0, 16.0), 4: (0.97, 4.0, 5.4),
                           8: (0.95, 4.0, 5.4)})  # fmt: skip
    assert tables.best_workers(plateau) == 4  # 8 is 2% better: noise
    text = tables.c4_explanation(plateau, "16")
    assert "With 4 workers the wait is 0.97 s" in text and "stops being the bottleneck" in text
    starved = sweep_table({1: (9.0, 4.0, 13.5), 0: (12.0, 4.0, 16.5), 4: (6.0, 4.0, 10.5)})
    text = tables.c4_explanation(starved, "4")
    assert "the 4 CPUs are the bottleneck" in text and "--loader gpu" in text


def test_c4_says_workers_compete_with_training_when_the_shortest_epoch_has_fewer():
    # the wait falls to 4 workers, but on 2 CPUs they slow the computation more
    c3 = sweep_table({1: (1.0, 8.0, 9.2), 0: (2.0, 7.0, 9.1), 4: (0.1, 10.0, 10.3)})
    assert tables.best_workers(c3) == 4
    c4 = tables.c4_one_vs_best(c3)
    assert list(c4["workers"]) == ["1", "4 (best)", "0 (shortest epoch)"]
    text = tables.c4_explanation(c3, "2")
    assert "shortest epoch was with 0 workers (9.10 s against 10.30 s with 4)" in text
    assert "compete with training for the 2 CPUs" in text and "10.00 s with 4 workers" in text


def test_a_section_of_one_run_names_it_as_one_run(study):
    source = report.section("C2", queries.exercise("C2")).source
    assert source.startswith(f"run {study['C2']};") and "parent" not in source


def test_a_run_made_by_the_lab_says_its_preset_beside_its_sizes(client):
    e = client.create_experiment("time-preset")
    run_id = log_run(
        client, e, command="time", exercise="C2", tags={"cifarexp.preset": "quick"},
        params={"train_size": 224, "batch_size": 16, "epochs": 5},
        epochs=[epoch(0.1, 1.0, 1.2, 2.0, 0.3)],
    )  # fmt: skip
    section = report.summarize("C2", run_id)
    # the preset in one line, its lr against the study's, then the run's own settings
    assert "lab preset quick (224 images, batch 16, lr 0.0125 (the study's 0.1 x 16/128), " in (
        section.source
    )
    assert "5 epochs), train_size=224" in section.source
    assert "batch_size=16, epochs=5" in section.source


def test_a_fast_path_run_says_its_switches_and_no_worker_count_it_did_not_use(client):
    e = client.create_experiment("time-fast")
    params = {"workers": 2, "loader": "gpu", "channels_last": True, "cuda_graph": True}
    run_id = log_run(client, e, command="time", exercise="C2", params=params,
                     epochs=[epoch(0.1, 1.0, 1.2, 2.0, 0.3)])  # fmt: skip
    source = report.summarize("C2", run_id).source
    assert "loader=gpu" in source and "workers=" not in source
    assert "channels_last=True, cuda_graph=True" in source


def test_a_profiled_time_run_answers_with_its_verdict(client):
    e = client.create_experiment("time-profiled")
    verdict = "input-bound: the GPU waited 74% of each step for the next batch (0 workers)"
    run_id = log_run(client, e, command="time", exercise="C2", tags={"cifarexp.verdict": verdict},
                     epochs=[epoch(0.1, 1.0, 1.2, 2.0, 0.3)])  # fmt: skip
    assert report.summarize("C2", run_id).text == f"Profile: {verdict}."


def test_plots_show_every_point_the_data_loading_curve_on_its_own_axis():
    from analysis import plots

    c3 = pd.DataFrame({"workers": [0, 1, 2, 4], "data-loading s": [11.6, 5.9, 4.0, 3.9],
                       "training s": [70.0] * 4, "total s": [85.0, 80.0, 82.0, 86.0],
                       "best": ["", "", "yes", ""]})  # fmt: skip
    figure = plots.workers_curve(c3)
    data_ax, total_ax = figure.axes  # data-loading on its own axis, not flat under 90 s
    assert data_ax.get_ylim()[1] < 15 and total_ax.get_ylim()[1] > 86
    assert data_ax.get_legend() is None and total_ax.get_legend() is None  # none over a point
    assert len(figure.legends) == 1
    one = pd.DataFrame({"device": ["cpu"], "data-loading s": [0.1], "training s": [90.0],
                        "avg epoch s": [90.1], "estimated": [""],
                        "speedup vs cpu": [1.0]})  # fmt: skip
    [ax] = plots.device_breakdown(one).axes
    assert ax.get_xscale() == "linear" and ax.get_xlim()[1] < 200  # not a log axis to 6000 s


def test_a_variants_tag_joined_with_commas_by_an_older_store_is_read_by_its_variants():
    # a variant may hold a comma (gpus=2,scaling=weak): the tag is read by the variants found
    found = {"gpus=1", "gpus=2,scaling=weak"}
    both = ["gpus=1", "gpus=2,scaling=weak"]
    assert _ran_variants("gpus=1; gpus=2,scaling=weak", found) == both  # today's tag
    assert _ran_variants("gpus=1,gpus=2,scaling=weak", found) == both  # an older store's
    # and a variant no run is found for is left over: missing, not swallowed
    assert _ran_variants("adam,sgd", {"sgd"}) == ["adam", "sgd"]
