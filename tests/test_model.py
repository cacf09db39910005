import pytest
import torch
from torch import nn

from cifarexp.training.models import build_model


def expected_parameters(batch_norm: bool) -> int:
    """ResNet-18 for CIFAR counted from its definition, not from the module."""
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731 - bias=False everywhere
    bn = lambda c: 2 * c if batch_norm else 0  # noqa: E731 - weight and bias
    total = conv(3, 64, 3) + bn(64)
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            total += conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if s != 1 or cin != cout:
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    return total + 512 * 10 + 10


def test_output_shape_is_batch_by_ten_classes():
    model = build_model()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_parameter_count_matches_the_definition():
    model = build_model()
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(True) == 11_173_962


def test_no_bn_variant_has_no_batchnorm_and_nothing_else_changes():
    model = build_model(batch_norm=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(False)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_every_conv_has_no_bias_and_there_is_no_max_pool():
    model = build_model()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_unknown_model_name_fails_loudly():
    with pytest.raises(KeyError, match="resnet18"):
        build_model("resnet50")
