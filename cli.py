"""Run the kfac-tune CLI from a checkout: ``python cli.py --help``."""
from kfac_tune.cli import main

if __name__ == "__main__":
    main()
