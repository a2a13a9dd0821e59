"""CLI subcommands besides `train`: each module defines `register(subparsers)` setting `func`."""
