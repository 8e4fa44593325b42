"""The applications on top of the trainer: sweep, report (and its plots), labels, predict/eval,
the scikit-learn estimator and the benchmarks. ``l2b.cli`` is the command line over them."""
