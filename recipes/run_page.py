"""Draw a recipe run's page again from its run folder.

    python -m recipes.run_page runs/bert_finetune/bert_finetune/<run>     # writes <run>/run.html

The run folder is the one above ``checkpoints/``; every recipe run writes its page there at the
end (:mod:`recipes.pages.run_page`). ``--redraw-heatmaps`` draws the heatmap PNGs again from
``heatmaps/history.json`` first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from recipes.pages.run_page import write_run_page

__all__ = ["main"]

USAGE = "usage: python -m recipes.run_page [--redraw-heatmaps] RUN_FOLDER"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    redraw = "--redraw-heatmaps" in argv
    folders = [a for a in argv if a != "--redraw-heatmaps"]
    if len(folders) != 1 or folders[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    try:
        path = write_run_page(folders[0], redraw_heatmaps=redraw)
    except ValueError as error:
        print(f"python -m recipes.run_page: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Run page: {path.resolve().as_uri()}")


if __name__ == "__main__":
    main()
