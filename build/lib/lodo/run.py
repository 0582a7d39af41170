"""``python -m lodo.run``: the experiment runner's command line (``lodo.experiment.cli``)."""

from lodo.experiment.cli import cli

if __name__ == "__main__":
    cli()
