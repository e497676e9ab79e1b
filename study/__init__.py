"""The MixSyn study that `run_experiment.py` runs: its plan (`plan`), cached stages (`runner`), report (`report`)."""
