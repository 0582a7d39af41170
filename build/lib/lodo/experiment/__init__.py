"""The experiment framework: command line, config validation, the training loop, run folders, reports, tuning.

It builds on the optimizer library (``lodo``), the baselines (``optimizers``) and the
tasks (``tasks``); none of those imports anything from here.
"""
