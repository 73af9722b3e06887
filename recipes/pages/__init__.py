"""Self-contained HTML pages: one per recipe run (:mod:`recipes.pages.run_page`) and one per
comparison sweep (:mod:`recipes.pages.sweep_page`). Pictures are embedded as PNG data, styles
inline, no script: any browser opens them from disk, offline, with no server."""
