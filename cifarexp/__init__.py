"""cifarexp: where the time of a ResNet-18 / CIFAR-10 training run goes, tracked with MLflow."""

__version__ = "0.1.0"
