"""Small reproducible experiments (run as modules, e.g. ``python -m gammacl.experiments.bias``)."""
