"""The study's commands: its catalogue, a tracked training run, the comparisons, the lab,
the inspection; each returns the run ids it made."""
