"""Embedding visualisation: 2-D projection (t-SNE / PCA), an interactive Plotly HTML page with thumbnails on hover,
W&B logging, and a Lightning callback that writes the page for the validation split at the end of training."""
from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image


def project_2d(embeddings: np.ndarray, method: str = "tsne", perplexity: float = 15.0, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) with scikit-learn's t-SNE (cosine metric; perplexity capped below N) or PCA."""
    x = np.asarray(embeddings, dtype=np.float32)
    if len(x) < 3:
        return np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(perplexity, (len(x) - 1) / 3)
        return TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"unknown projection '{method}': choose tsne or pca")


def thumbnail_b64(image: np.ndarray | Image.Image, size: int = 64) -> str:
    """A small JPEG of an (H, W, 3) uint8 image as a `data:` URI, for embedding in the HTML page."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    im = im.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# Hovering a point shows its thumbnail in a fixed box beside the plot (Plotly's hover text cannot hold images).
_HOVER_JS = """
var plot = document.getElementById('{plot_id}');
var box = document.createElement('div');
box.style.cssText = 'position:fixed;top:10px;right:10px;padding:6px;background:#fff;border:1px solid #888;' +
                    'font:12px sans-serif;display:none;z-index:10';
document.body.appendChild(box);
plot.on('plotly_hover', function(d) {{
  var p = d.points[0], c = p.customdata;
  box.innerHTML = '<img src="' + c[0] + '" width="96"><br>' + c[1] + '<br>' + c[2];
  box.style.display = 'block';
}});
plot.on('plotly_unhover', function() {{ box.style.display = 'none'; }});
"""


def embedding_figure(coords: np.ndarray, identities: list[str], files: list[str], thumbnails: list[str],
                     title: str = "Face embeddings"):
    """Plotly scatter of (N, 2) coords, one trace per identity (so the legend filters), hover data =
    [thumbnail data-URI, identity, file] in `customdata`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    order = sorted(set(identities))
    for name in order:
        idx = [i for i, n in enumerate(identities) if n == name]
        fig.add_trace(go.Scattergl(
            x=coords[idx, 0], y=coords[idx, 1], mode="markers", name=name, marker=dict(size=8),
            customdata=[[thumbnails[i], identities[i], files[i]] for i in idx],
            hovertemplate="%{customdata[1]}<br>%{customdata[2]}<extra></extra>",
        ))
    fig.update_layout(title=title, template="plotly_white", legend_title_text=f"{len(order)} identities",
                      width=1000, height=800)
    return fig


def write_embedding_html(path: str | Path, coords: np.ndarray, identities: list[str], files: list[str],
                         thumbnails: list[str], title: str = "Face embeddings") -> Path:
    """Write the interactive page (plotly.js inlined, works offline); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = embedding_figure(coords, identities, files, thumbnails, title)
    fig.write_html(path, include_plotlyjs=True, full_html=True, div_id="embeddings",
                   post_script=_HOVER_JS.format(plot_id="embeddings"))
    return path


def log_html_to_wandb(path: str | Path, key: str = "embeddings") -> bool:
    """Log the page to the active W&B run (as wandb.Html); False when no run is active or wandb is missing."""
    try:
        import wandb
    except ImportError:
        return False
    if wandb.run is None:
        return False
    wandb.log({key: wandb.Html(Path(path).read_text(), inject=False)})
    return True


class EmbeddingPlotCallback(L.Callback):
    """At the end of `fit`, embed the validation split, project it to 2-D and write `<run dir>/embeddings_val.html`
    (and log it to W&B when the run logs there). Needs a DataModule with `dataset("val")` returning
    (path, label) `items` and `people["val"]` (identity names), as `datamodules.lfw.LFWDataModule` does.

    Args:
        embed_items: `embed_items(model, paths, with_thumbnails=True) -> (embeddings (N, D), thumbnails)`, the task's
            own preprocessing (the callback knows no task).
        method: "tsne" or "pca"; max_images: at most this many images are drawn.
    """

    def __init__(self, embed_items: Callable, method: str = "tsne", max_images: int = 2000):
        self.embed_items = embed_items
        self.method = method
        self.max_images = max_images

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        dm = getattr(trainer, "datamodule", None)
        if trainer.fast_dev_run or not trainer.is_global_zero or dm is None or not hasattr(dm, "dataset"):
            return
        items = dm.dataset("val").items[: self.max_images]
        names = sorted(dm.people["val"])
        emb, thumbs = self.embed_items(pl_module, [p for p, _ in items], with_thumbnails=True)
        coords = project_2d(emb.numpy(), self.method, seed=int(pl_module.cfg.seed))
        out = write_embedding_html(Path(trainer.default_root_dir) / "embeddings_val.html", coords,
                                   [names[y] for _, y in items], [Path(p).name for p, _ in items], thumbs,
                                   title=f"Validation embeddings ({self.method}), epoch {trainer.current_epoch}")
        log_html_to_wandb(out, "val/embeddings")
