"""Where a long run is: tqdm bars on stderr (tables go to stdout). tqdm hides them when stderr is not a terminal."""
from __future__ import annotations

import sys

from tqdm import tqdm


def steps(items, desc, label=lambda x: f"n={x}"):
    """Yield ``items`` one by one while a bar on stderr shows ``desc`` and the current item (``label(item)``)."""
    items = list(items)
    with tqdm(total=len(items), desc=desc, file=sys.stderr, leave=False, disable=None, dynamic_ncols=True) as bar:
        for item in items:
            bar.set_postfix_str(label(item), refresh=True)
            yield item
            bar.update(1)


def write(text):
    """Print ``text`` on stdout without breaking the bars on stderr (tqdm clears and redraws them)."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()
