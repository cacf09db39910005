"""`cifarexp compare`: two studies side by side, noise-aware, with a regression check; and
the reference study beside every item of the report."""

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import report
from analysis.compare import Row, parse_source
from analysis.measures import TIME, Measure
from benchmarks.fake_runs import epoch, log_run, log_study
from cifarexp import tracking
from tests.conftest import all_runs, one_message

STUDY_PARAMS = {"batch_size": 128, "train_size": 50000, "workers": 2, "dataset": "synthetic"}


@pytest.fixture
def baseline(tmp_path, empty_store) -> tuple[str, MlflowClient]:
    """A second store beside the test's own (the baseline's): its URI and a client."""
    path = tmp_path / "baseline.db"
    path.write_bytes(empty_store.read_bytes())
    uri = f"sqlite:///{path}"
    return uri, MlflowClient(uri)


def log_time(
    client: MlflowClient,
    *,
    slower: float = 1.0,
    joules: float | None = None,
    data_s: float = 2.0,
    **params: object,
) -> str:
    """A finished `time` run (C2) of three epochs around 10 s (`data_s` of them waiting for
    data), each `slower` times longer (and around `joules` each, if given)."""
    experiment = client.create_experiment(f"cifarexp-time-{len(client.search_experiments())}")
    energy = [{"energy_j": joules * k} if joules else {} for k in (1.0, 1.02, 0.99)]
    wait, train = data_s * slower, (9.8 - data_s) * slower
    return log_run(
        client, experiment, command="time", exercise="C2", params={**STUDY_PARAMS, **params},
        epochs=[{**epoch(wait, train, total * slower, 1.0, 0.6), **joules_of}
                for total, joules_of in zip((10.0, 10.2, 9.9), energy, strict=True)],
    )  # fmt: skip


def compared(out: Path) -> pd.DataFrame:
    """The comparison table the command wrote, indexed by (item, figure)."""
    return pd.read_csv(out / "comparison.csv").set_index(["item", "figure"])


def compare_run(client: MlflowClient):
    """The run the comparison was logged as."""
    [run] = [r for r in all_runs(client) if r.data.tags.get("cifarexp.command") == "compare"]
    return run


def test_identical_studies_are_within_noise_and_the_check_passes(cli, client, baseline, tmp_path):
    # given the same study in the baseline's store and in yours
    uri, other = baseline
    log_study(other)
    log_study(client)
    # when yours is compared with it, with a regression check
    result = cli("compare", "--baseline", uri, "--fail-if-slower", "5%", "--out", "cmp")
    # then every time is within noise, every other figure the same, and the check passes
    assert result.exit_code == 0, result.output
    table = compared(tmp_path / "cmp")
    is_time = table.index.get_level_values("figure").str.contains(" s/epoch| s \\(| s$")
    assert set(table.loc[is_time, "verdict"]) == {"within noise"}
    assert set(table.loc[~is_time, "verdict"]) == {"same"}
    assert table.loc[("C2", "epoch s"), "yours"] == "14.00 s (13.50–14.50)"
    assert "nothing slower beyond 5% and the noise" in one_message(result.output)
    assert "slower:" not in result.output
    # and it is logged as its own run: the table, the plots, the verdict as its description
    run = compare_run(client)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"comparison.csv", "comparison.json", "compare.md", "compare_c2.png"} <= artifacts
    assert {"compare_c3.png", "compare_c5.png", "compare_c6.png"} <= artifacts
    assert "Regression check: nothing slower" in run.data.tags["mlflow.note.content"]
    assert run.data.params["baseline"] == uri and run.info.run_name == f"compare with {uri}"


def test_epochs_20_percent_slower_are_flagged_one_line_each_and_exit_1(
    cli, client, baseline, tmp_path
):
    # given a baseline and yours, every epoch of which took 20% longer
    uri, other = baseline
    log_time(other)
    log_time(client, slower=1.2)
    # when compared with a 5% threshold
    result = cli("compare", "--baseline", uri, "--fail-if-slower", "5%", "--out", "cmp")
    # then each time is slower, one line each, and the command fails
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("slower:")]
    assert len(lines) == 3  # data-loading, training, the epoch
    assert (
        "slower: C2 epoch s: 12.00 s against 10.00 s (+20.0%, beyond 5% and beyond both "
        "sides' epochs)"
    ) in lines
    table = compared(tmp_path / "cmp")
    assert table.loc[("C2", "epoch s"), "verdict"] == "slower"
    assert table.loc[("C2", "epoch s"), "ratio"] == pytest.approx(1.2)
    assert table.loc[("C2", "final accuracy"), "verdict"] == "same"
    assert "3 slower beyond 5%" in compare_run(client).data.tags["mlflow.note.content"]


def test_a_slow_down_under_the_threshold_or_without_one_does_not_fail(cli, client, baseline):
    # given yours 20% slower
    uri, other = baseline
    log_time(other)
    log_time(client, slower=1.2)
    # when the threshold is above it, or there is none
    # then the comparison says slower, and the command does not fail
    assert cli("compare", "--baseline", uri, "--fail-if-slower", "25%").exit_code == 0
    result = cli("compare", "--baseline", uri, "--quiet")
    assert result.exit_code == 0
    assert one_message(result.output).startswith(
        "Yours against the baseline: 3 slower, 1 same."
    )  # --quiet: the verdict without the table


def test_one_epoch_each_is_within_noise_up_to_1_percent(cli, client, baseline, tmp_path):
    # given one epoch on each side: 10.00 s, then 10.05 s and 10.50 s
    uri, other = baseline
    one_epoch = lambda c, total: log_run(  # noqa: E731
        c, c.create_experiment(f"t{total}"), command="time", exercise="C2",
        params=STUDY_PARAMS, epochs=[epoch(0.2, 9.6, total, 1.0, 0.6)],
    )  # fmt: skip
    one_epoch(other, 10.0)
    one_epoch(client, 10.05)
    # when compared, then 0.5% is within noise (no spread to judge it by: 1% is the floor)
    assert cli("compare", "--baseline", uri, "--out", "cmp").exit_code == 0
    assert compared(tmp_path / "cmp").loc[("C2", "epoch s"), "verdict"] == "within noise"
    # and 5% is slower
    one_epoch(client, 10.5)
    assert cli("compare", "--baseline", uri, "--out", "cmp").exit_code == 0
    assert compared(tmp_path / "cmp").loc[("C2", "epoch s"), "verdict"] == "slower"


def test_a_wait_that_differs_by_less_than_1_percent_of_its_epoch_is_within_noise():
    # given one epoch on each side of about 10 s, whose data-loading wait went from 0.20 s
    # to 0.216 s (+8% of itself, 0.16% of the epoch: C3's one epoch per worker count)
    baseline = Measure("C3", "data-loading s/epoch (workers=0)", TIME, (0.20,), epoch_s=10.0)
    yours = replace(baseline, values=(0.216,), epoch_s=10.1)
    # then it is within noise, and no regression
    assert Row("C3", baseline.figure, baseline, yours).verdict == "within noise"
    assert not Row("C3", baseline.figure, baseline, yours).slower_than(0.05)
    # but a wait 0.5 s longer (5% of the epoch) is slower
    longer = replace(baseline, values=(0.70,), epoch_s=10.5)
    assert Row("C3", baseline.figure, baseline, longer).verdict == "slower"
    assert Row("C3", baseline.figure, baseline, longer).slower_than(0.05)


def test_figures_measured_with_other_settings_are_not_comparable(cli, client, baseline, tmp_path):
    # given a baseline at batch 128 and yours at batch 16, 20% slower
    uri, other = baseline
    log_time(other)
    log_time(client, slower=1.2, batch_size=16)
    # when compared with a regression check
    result = cli("compare", "--baseline", uri, "--fail-if-slower", "5%", "--out", "cmp")
    # then no figure is compared, none is called slower, and the check passes
    assert result.exit_code == 0, result.output
    table = compared(tmp_path / "cmp")
    assert set(table["verdict"]) == {"not comparable: batch_size 128 vs 16"}
    assert table["ratio"].isna().all()
    assert table.loc[("C2", "epoch s"), "baseline"].startswith("10.00 s")  # both still shown


def test_a_dataset_that_differs_leaves_times_comparable_but_not_accuracies(
    cli, client, baseline, tmp_path
):
    uri, other = baseline
    log_time(other, dataset="cifar10")
    log_time(client)
    assert cli("compare", "--baseline", uri, "--out", "cmp").exit_code == 0
    table = compared(tmp_path / "cmp")
    assert table.loc[("C2", "epoch s"), "verdict"] == "within noise"
    assert table.loc[("C2", "final accuracy"), "verdict"] == (
        "not comparable: dataset cifar10 vs synthetic"
    )


def test_energy_is_compared_where_both_sides_logged_it_and_never_fails_the_check(
    cli, client, baseline, tmp_path
):
    uri, other = baseline
    log_time(other, joules=2000)
    log_time(client, joules=3000)
    result = cli("compare", "--baseline", uri, "--fail-if-slower", "5%", "--out", "cmp")
    assert result.exit_code == 0, result.output
    energy = compared(tmp_path / "cmp").loc[("C2", "energy J/epoch")]
    assert (energy["baseline"], energy["yours"]) == (
        "2000.00 J (1980.00–2040.00)",
        "3000.00 J (2970.00–3060.00)",
    )
    assert energy["verdict"] == "more" and energy["ratio"] == pytest.approx(1.5)


def test_an_item_one_side_lacks_is_missing_not_zero(cli, client, baseline, tmp_path):
    # given a whole study as the baseline, and only C2 in yours
    uri, other = baseline
    log_study(other)
    log_time(client, data_s=0.2)  # waiting as long as the study's C2
    # when compared
    result = cli("compare", "--baseline", uri, "--fail-if-slower", "5%", "--out", "cmp")
    # then the items you lack are missing (no value, no ratio), and nothing fails
    assert result.exit_code == 0, result.output
    table = compared(tmp_path / "cmp")
    sgd = table.loc[("C6", "training s/epoch (optimizer=sgd)")]
    assert (sgd["yours"], sgd["verdict"]) == ("missing", "missing in yours")
    assert pd.isna(sgd["ratio"]) and pd.isna(sgd["difference"])
    assert table.loc[("Q1-Q4", "Q1 conv layers"), "baseline"] == "20"
    assert "missing in yours" in one_message(result.output)


def test_the_baseline_may_be_an_experiment_or_run_ids_of_this_store(cli, client, tmp_path):
    # given a study in an experiment 'last-month', then a slower C2 run of yours
    old = client.create_experiment("last-month")
    c2 = log_run(
        client, old, command="time", exercise="C2", params=STUDY_PARAMS,
        epochs=[epoch(0.2, 9.6, total, 1.0, 0.6) for total in (10.0, 10.2, 9.9)],
    )  # fmt: skip
    log_time(client, slower=1.2)
    # when compared with the experiment, or with its run by id
    # then both find the old run, and the slow-down
    for source in ("last-month", c2):
        result = cli("compare", "--baseline", source, "--fail-if-slower", "5%")
        assert result.exit_code == 1, result.output
        assert "slower: C2 epoch s: 12.00 s against 10.00 s" in result.output


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("sqlite:///nowhere.db", "--baseline: no tracking store at sqlite:///nowhere.db"),
        ("no-such-experiment", "--baseline: no experiment 'no-such-experiment' in sqlite:///"),
        ("0" * 32 + ",abc", "--baseline: 'abc' is not a run id (32 hex digits)"),
        ("0" * 32, f"--baseline: no run {'0' * 32} in sqlite:///"),
        ("ftp://host/x", "--baseline: 'ftp://host/x' is not a tracking URI"),
    ],
)
def test_a_baseline_that_names_nothing_is_one_clear_line(cli, store, tmp_path, source, message):
    result = cli("compare", "--baseline", source)
    assert result.exit_code == 2
    assert message in one_message(result.output)
    assert not (tmp_path / "nowhere.db").exists()  # never created


def test_a_threshold_that_is_no_percentage_is_one_clear_line(cli, store, baseline):
    result = cli("compare", "--baseline", baseline[0], "--fail-if-slower", "fast")
    assert result.exit_code == 2
    assert "--fail-if-slower: 'fast' is not a percentage; give e.g. 5%" in one_message(
        result.output
    )


def test_the_report_shows_the_reference_beside_each_item(client, tmp_path):
    # given a study in the store
    log_study(client)
    # when the report is written
    path = report.write_report(report.build_report(), tmp_path / "out", "sqlite:///x.db")
    # then each item has the reference's figures beside yours, and what is not comparable
    text = path.read_text()
    assert "**C2: beside the reference study**" in text
    c2 = pd.read_csv(tmp_path / "out" / "c2_reference.csv").set_index("figure")
    assert c2.loc["epoch s", "reference"] == "66.8 s for 5 epochs"
    assert c2.loc["epoch s", "yours"] == "14.00 s (13.50–14.50)"
    assert c2.loc["epoch s", "yours / reference"] == pytest.approx(14.0 / 13.36, rel=1e-4)
    assert c2.loc["epoch s", "comparable"].startswith("no: an older GPU, model unknown")
    c6 = pd.read_csv(tmp_path / "out" / "c6_reference.csv").set_index("figure")
    assert c6.loc["final accuracy (optimizer=sgd)", "yours"] == "72.0%"
    assert c6.loc["final accuracy (optimizer=nesterov)", "yours"] == "missing"
    q = pd.read_csv(tmp_path / "out" / "q1_q4_reference.csv").set_index("figure")
    assert q.loc["Q1 conv layers", "reference"] == "wrong"
    assert q.loc["Q1 conv layers", "yours"] == 20
    assert q.loc["Q1 conv layers", "comparable"].startswith("no: the reference's answer is wrong")


@pytest.mark.parametrize(
    "text", ["http://alice:s3cret@mlflow.example:5000", "postgresql://alice:s3cret@db/mlflow"]
)
def test_a_baseline_is_shown_with_its_password_masked(text):
    # Given a baseline URI with a password, when it is shown (the comparison's baseline
    # param) or names the comparison's run, then the password is masked.
    for shown in (parse_source(text).shown, tracking.redact(parse_source(text).text)):
        assert "s3cret" not in shown and "alice:***@" in shown
