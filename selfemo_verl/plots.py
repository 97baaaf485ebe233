"""PNG figures of results (matplotlib's Agg canvas, no display): confusion matrices and metric curves.

Core module (no verl, no ray).
"""

from __future__ import annotations


def new_axes(figsize: tuple[float, float]):
    """A figure on matplotlib's Agg canvas (no display, no pyplot state) and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (100 dpi), ready for `files.atomic_write`."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def confusion_png(confusion: dict, title: str) -> bytes:
    """The confusion matrix (gold rows, predicted columns incl. parse failures) as PNG bytes (Agg).

    >>> confusion_png({"rows": ["joy", "fear"], "counts": [[2, 0, 1], [1, 1, 0]]}, "demo")[:4]
    b'\\x89PNG'
    """
    counts, rows, cols = confusion["counts"], confusion["rows"], [*confusion["rows"], "parse fail"]
    fig, ax = new_axes((1.0 + 0.8 * len(cols), 1.0 + 0.7 * len(rows)))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel="predicted", ylabel="gold", title=title)
    dark = max(max(row) for row in counts) / 2
    for i, row in enumerate(counts):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > dark else "black")
    fig.tight_layout()
    return png_bytes(fig)
