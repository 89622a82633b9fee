"""``python -m effedu.bench [name ...] [--threads N] [--quick] [--list] [--naive-8192]``"""
import sys

from . import main

sys.exit(main())
