"""``python -m medseg.cli`` (used by torchrun): the console entry point."""

from medseg.cli import main

main()
