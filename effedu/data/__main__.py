"""``python -m effedu.data [--regenerate]`` (see :mod:`effedu.data.cli`)."""
from .cli import main

main()
