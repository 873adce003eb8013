"""`python -m compress` is the `compress` command."""

from .cli import main

main()
