"""Q1–Q4: every count checked against an independent count from the model or its definition."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cifarexp.training.anatomy import (
    MAIN_PATH,
    SHORTCUT,
    STEM,
    Count,
    conv_layers,
    count_conv_layers,
    last_linear,
    optimizer_anatomy,
    parameter_counts,
)
from cifarexp.training.models import build_model
from tests.conftest import all_runs

BATCH = 2  # the counts do not depend on the batch; a small one keeps backward fast on CPU


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))


def params_of(model: nn.Module) -> tuple[int, int]:
    """(tensors, elements) of the model's parameters, summed directly."""
    params = list(model.parameters())
    return len(params), sum(p.numel() for p in params)


def bn_params_of(model: nn.Module) -> tuple[int, int]:
    params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    return len(params), sum(p.numel() for p in params)


def spec_conv_layers() -> tuple[int, int, int]:
    """(stem, main path, shortcut) convs of the CIFAR ResNet-18, counted from its definition."""
    main = shortcut = 0
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            main += 2  # conv3x3-BN-ReLU-conv3x3-BN
            s = stride if block == 0 else 1
            shortcut += s != 1 or cin != cout  # a 1x1 projection where the shape changes
            cin = cout
    return 1, main, shortcut


@pytest.fixture(scope="module")
def models() -> dict[bool, nn.Module]:
    torch.manual_seed(0)
    return {bn: build_model(batch_norm=bn) for bn in (True, False)}


@pytest.fixture(scope="module")
def anatomies(models):
    """One real step per (batch_norm, optimizer): 4 forward/backward passes in all."""
    return {
        (bn, name): optimizer_anatomy(model, name, batch())
        for bn, model in models.items()
        for name in ("sgd", "adam")
    }


# --- Q1, Q2


@pytest.mark.parametrize("bn", [True, False])
def test_q1_counts_conv_modules_where_they_are(models, bn):
    model = models[bn]
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    shortcut = [name for name, _ in convs if ".shortcut." in name]
    stem = [name for name, _ in convs if not name.startswith("layer")]

    count = count_conv_layers(model)

    assert count.total == len(convs) == sum(spec_conv_layers()) == 20
    assert (count.stem, count.main_path, count.shortcut) == spec_conv_layers() == (1, 16, 3)
    assert (len(stem), len(convs) - len(stem) - len(shortcut), len(shortcut)) == (1, 16, 3)
    table = conv_layers(model)
    assert list(table["module"]) == [name for name, _ in convs]
    assert set(table.loc[table["where"] == SHORTCUT, "module"]) == set(shortcut)
    assert set(table.loc[table["where"] == STEM, "module"]) == set(stem)
    assert (table["where"] == MAIN_PATH).sum() == 16
    assert table["parameters"].sum() == sum(m.weight.numel() for _, m in convs)  # bias=False


@pytest.mark.parametrize("bn", [True, False])
def test_q2_is_the_size_of_the_vector_the_last_linear_layer_receives(models, bn):
    model = models[bn]
    seen = []
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    hook = linear.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape))
    with torch.no_grad():
        model.eval()(torch.randn(BATCH, 3, 32, 32))
    hook.remove()

    name, layer = last_linear(model)

    assert layer is linear and name == "fc"
    assert layer.in_features == seen[0][-1] == 512 and len(seen[0]) == 2  # a vector per image


# --- Q3, Q4


@pytest.mark.parametrize("bn", [True, False])
def test_trainable_parameters_and_buffers_are_the_models(models, bn):
    model = models[bn]
    counts = parameter_counts(model)
    buffers = list(model.buffers())
    assert (counts.trainable.tensors, counts.trainable.elements) == params_of(model)
    assert counts.trainable.bytes == 4 * params_of(model)[1]  # float32
    assert counts.buffers.tensors == len(buffers) == (60 if bn else 0)  # 3 per BN layer
    assert counts.buffers.elements == sum(b.numel() for b in buffers)


def test_the_bn_free_model_differs_by_exactly_the_bn_parameters(models):
    with_bn, without = parameter_counts(models[True]), parameter_counts(models[False])
    bn_tensors, bn_elements = bn_params_of(models[True])
    assert bn_tensors == 40 and bn_elements == 2 * (64 * 5 + 128 * 5 + 256 * 5 + 512 * 5)
    assert with_bn.trainable.tensors - without.trainable.tensors == bn_tensors
    assert with_bn.trainable.elements - without.trainable.elements == bn_elements
    assert count_conv_layers(models[True]) == count_conv_layers(models[False])


def test_no_gradients_before_backward_and_the_callers_model_is_untouched(models, anatomies):
    for anatomy in anatomies.values():
        assert anatomy.grads_before_backward == Count()
    assert all(p.grad is None for model in models.values() for p in model.parameters())


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_every_parameter_gets_a_gradient_of_its_own_size(models, anatomies, bn, name):
    tensors, elements = params_of(models[bn])
    anatomy = anatomies[bn, name]
    assert anatomy.trainable == anatomy.grads == Count(tensors, elements, 4 * elements)


@pytest.mark.parametrize("bn", [True, False])
def test_sgd_keeps_one_momentum_buffer_and_adam_two_moments_and_a_step(models, anatomies, bn):
    n, elements = params_of(models[bn])
    like_params = Count(n, elements, 4 * elements)

    sgd, adam = anatomies[bn, "sgd"], anatomies[bn, "adam"]

    assert sgd.state == {"momentum_buffer": like_params}
    assert adam.state == {
        "step": Count(n, n, 4 * n),  # one float32 scalar per parameter
        "exp_avg": like_params,
        "exp_avg_sq": like_params,
    }
    assert adam.state_total.elements == 2 * elements + n
    assert sgd.state_total.mib == pytest.approx(4 * elements / 2**20)


# --- the command and its MLflow run


def artifact(client, run, path: str) -> str:
    return Path(client.download_artifacts(run.info.run_id, path)).read_text()


def test_inspect_prints_the_answers_and_records_them_in_one_run(cli, client, models):
    tensors, elements = params_of(models[True])

    result = cli("inspect", "--batch-size", str(BATCH))

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Q1" in out and "shortcut projections" in out and "Q2" in out and "512" in out
    assert f"{elements:,} ({tensors})" in out
    assert "Same for sgd and adam" in out and "Different: the optimizer state" in out
    [run] = all_runs(client)
    assert run.info.run_id in out and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "cifarexp-inspect"
    tags = run.data.tags
    assert tags["cifarexp.command"] == "inspect" and tags["cifarexp.exercise"] == "Q1-Q4"
    assert tags["cifarexp.variant"] == "bn" and tags["cifarexp.dataset"] == "synthetic"
    assert "cifarexp.torch_version" in tags
    params = run.data.params
    assert params["batch_norm"] == "True" and params["optimizers"] == "sgd,adam"
    assert params["batch_size"] == str(BATCH)
    m = run.data.metrics
    assert m["conv_layers"] == 20 and m["conv_layers_shortcut"] == 3
    assert m["last_linear_in_features"] == 512
    assert m["trainable_params"] == elements and m["trainable_param_tensors"] == tensors
    assert m["sgd_grad_tensors_before_backward"] == 0 and m["sgd_grad_elements"] == elements
    assert m["sgd_state_elements"] == elements
    assert m["adam_state_elements"] == 2 * elements + tensors
    assert m["adam_state_exp_avg_sq_tensors"] == tensors

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_summary.txt", "q1_conv_layers.csv", "q3_q4_optimizers.csv"} <= artifacts
    summary = artifact(client, run, "model_summary.txt")
    assert f"Total params: {elements:,}" in summary
    assert f"[{BATCH}, 64, 32, 32]" in summary  # the stem's output for the batch given
    assert len(artifact(client, run, "q1_conv_layers.csv").strip().splitlines()) == 1 + 20
    answers = json.loads(artifact(client, run, "answers.json"))
    assert answers["q1_conv_layers"]["total"] == 20
    # the run's description answers Q1-Q4 in a few lines
    note = run.data.tags["mlflow.note.content"]
    assert "**Q1**: 20 convolutional layers" in note and "receives a vector of 512" in note
    assert f"{elements:,} trainable parameters" in note
    assert f"{4 * elements / 2**20:.2f} MiB" in note  # SGD's state, rounded once


def test_json_prints_only_the_answers_of_the_bn_free_model(cli, client, models):
    tensors, elements = params_of(models[False])

    result = cli("inspect", "--json", "--no-bn", "--optimizers", "adam", "--batch-size", "2")

    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    [run] = all_runs(client)
    assert answers["run_id"] == run.info.run_id and run.data.tags["cifarexp.variant"] == "no-bn"
    assert answers["variant"] == "no-bn"
    assert answers["q1_conv_layers"] == {"total": 20, "stem": 1, "main_path": 16, "shortcut": 3}
    assert answers["q2_last_linear"]["in_features"] == 512
    assert answers["trainable_parameters"]["elements"] == elements
    assert answers["buffers"]["tensors"] == 0
    adam = answers["q3_q4_optimizers"]["adam"]
    assert list(answers["q3_q4_optimizers"]) == ["adam"]
    assert adam["gradients_before_backward"]["tensors"] == 0
    assert adam["gradients_after_backward"]["elements"] == elements
    assert adam["state"]["exp_avg"]["tensors"] == adam["state"]["exp_avg_sq"]["tensors"] == tensors
    assert adam["state_total"]["elements"] == 2 * elements + tensors


@pytest.mark.parametrize(
    "args",
    [
        ["--optimizers", "sgd,foo"],
        ["--optimizers", ""],
        ["--optimizers", "sgd,sgd"],
        ["--optimizers", "sgd,,adam"],
        ["--batch-size", "0"],
    ],
)
def test_bad_input_exits_2_with_one_clear_line_and_no_run(cli, client, args):
    result = cli("inspect", *args)
    assert result.exit_code == 2, result.output
    assert args[0] in result.output and "Traceback" not in result.output
    assert all_runs(client) == []
