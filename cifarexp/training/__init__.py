"""Training, knowing nothing of MLflow: the config-driven build, the timed epoch loop (reporting
through callbacks), data, model, optimizer, fast path, processes, profiling, model anatomy."""
