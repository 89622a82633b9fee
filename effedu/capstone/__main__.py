"""``python -m effedu.capstone run|show|guide …`` (see :mod:`effedu.capstone.run`)."""
from .run import main

main()
