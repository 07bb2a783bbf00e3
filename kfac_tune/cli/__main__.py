"""``python -m kfac_tune.cli``: the ``kfac-tune`` command."""
from kfac_tune.cli import main

main()
