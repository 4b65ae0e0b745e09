"""The embedding plot of ``pft simulate``: source, target and translated features side by side.

t-SNE (PCA for few points) from scikit-learn and matplotlib, both in the ``sim`` extra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_embedding"]


def plot_embedding(
    groups: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    out_png: Path,
    title: str,
    seed: int = 0,
) -> Path:
    """2-D t-SNE (PCA when there are few points) of feature sets, e.g. source / target / translated.

    Marker = feature set, colour = expression class.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    names = list(groups)
    stacked = np.concatenate([groups[n] for n in names])
    if len(stacked) >= 60:
        perplexity = min(30.0, (len(stacked) - 1) / 3)
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(stacked)
        method = "t-SNE"
    else:
        xy = PCA(2, random_state=seed).fit_transform(stacked)
        method = "PCA"
    markers = ["o", "^", "s", "x", "D"]
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    start = 0
    cmap = plt.get_cmap("tab10")
    for k, name in enumerate(names):
        n = len(groups[name])
        part = xy[start : start + n]
        start += n
        for c, cname in enumerate(class_names):
            sel = labels[name] == c
            if sel.any():
                ax.scatter(
                    part[sel, 0],
                    part[sel, 1],
                    s=10,
                    marker=markers[k % len(markers)],
                    color=cmap(c % 10),
                    alpha=0.6,
                    label=f"{name}: {cname}",
                )
    ax.set_title(f"{title} ({method})")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
