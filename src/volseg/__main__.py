"""`python -m volseg` runs the command-line interface."""

from volseg.cli import main

main()
