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
        # The figure goes into the Output widget as display data, not through ``with out:``:
        # capturing prints inside a cell that nbclient executes races its reply on the shell channel.
        fig = plt.figure(figsize=(8, 3.6))
        try:
            draw(value, fig)
            out.outputs = ()
            out.append_display_data(fig)
        finally:
            plt.close(fig)

    control.observe(lambda change: redraw(change["new"]), names="value")
    box = widgets.VBox([control, out])
    display(box)
    redraw(control.value)
    return box
