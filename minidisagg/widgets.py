"""ipywidgets helpers the labs share: a control that re-runs a small measurement and redraws its figure."""

from __future__ import annotations

from typing import Any, Callable

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display
from matplotlib.figure import Figure


def interactive_figure(control: widgets.ValueWidget, draw: Callable[[Any, Figure], None]) -> widgets.VBox:
    """Show ``control`` above a figure; ``draw(value, fig)`` runs now and again whenever the value changes.

    ``draw`` receives a cleared figure and adds its own axes. Returns the widget box (already displayed).
    """
    out = widgets.Output()

    def redraw(value: Any) -> None:
        with out:
            out.clear_output(wait=True)
            fig = plt.figure(figsize=(8, 3.6))
            draw(value, fig)
            plt.show()

    control.observe(lambda change: redraw(change["new"]), names="value")
    box = widgets.VBox([control, out])
    display(box)
    redraw(control.value)
    return box
