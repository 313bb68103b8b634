"""A small convolutional autoencoder trained on the session's own crops, for species discovery.

The unsupervised route of the method (METHOD.md, "Autoencoder + clustering", UCL review of
Si(001)): a convolutional autoencoder's latent vector is a low-dimensional representation of each
object, clustered afterwards. Here it is trained on the rotation-canonicalised crops of the
session (:func:`agent.discovery.canonical_pixels`, 24 x 24), exported to ONNX, and run with
onnxruntime, like every other encoder of the agent. **torch is needed only to train**
(:func:`train_autoencoder`, the ``export`` extra); :class:`AutoencoderEncoder` needs only
onnxruntime, so a model folder trained once can be used where torch is not installed.

Architecture (input 1 x 24 x 24, values 0..1 mean-centred per crop):
conv 3x3 (16) -> ReLU -> stride-2 conv (32, 12 x 12) -> ReLU -> stride-2 conv (32, 6 x 6) -> ReLU
-> linear 1152 -> ``latent`` (default 16); the decoder mirrors it with transposed convolutions.
Loss: mean squared reconstruction error; Adam (lr 2e-3), ``epochs`` passes, batch 64, seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["AutoencoderEncoder", "train_autoencoder", "SIDE"]

SIDE = 24


def _inputs(grey: np.ndarray) -> np.ndarray:
    """uint8 ``(N, S, S)`` crops -> float32 ``(N, 1, 24, 24)`` canonical poses (see module docstring)."""
    from stm_agent.agent.discovery import canonical_pixels

    c = canonical_pixels(grey, size=SIDE)
    return (c * 4.0).astype(np.float32)[:, None]  # unit-norm crops -> values of order 0.1..1


class AutoencoderEncoder:
    """Encoder half of a trained autoencoder, run with onnxruntime.

    Parameters
    ----------
    model_dir : str | Path
        Folder with ``autoencoder.onnx`` and ``autoencoder.json`` (written by :func:`train_autoencoder`).

    Raises
    ------
    ModelError
        The folder or its files are missing or unreadable.
    """

    name = "autoencoder"

    def __init__(self, model_dir: str | Path):
        import onnxruntime as ort

        from stm_agent.agent.errors import ModelError

        d = Path(model_dir)
        try:
            self.meta = json.loads((d / "autoencoder.json").read_text())
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self.session = ort.InferenceSession(str(d / "autoencoder.onnx"), so, providers=["CPUExecutionProvider"])
        except (OSError, ValueError) as exc:
            raise ModelError(d, f"not an autoencoder folder ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors
            raise ModelError(d, f"cannot load autoencoder.onnx ({exc})") from None
        self.model_dir = d
        self.dim = int(self.meta["latent"])
        self.id = f"autoencoder:{self.meta.get('sha256', '')[:12]}"

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """uint8 ``(N, S, S)`` crops -> float32 ``(N, latent)`` latent vectors (not normalised)."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        x = _inputs(crops)
        return np.asarray(self.session.run(None, {"crop": x})[0], np.float32)


def train_autoencoder(grey: np.ndarray, out_dir: str | Path | None = None, *, latent: int = 16, epochs: int = 60,
                      seed: int = 0) -> AutoencoderEncoder:
    """Train the autoencoder on ``grey`` crops, export its encoder to ONNX, load it with onnxruntime.

    Parameters
    ----------
    grey : np.ndarray
        uint8 ``(N, S, S)`` crops of the session (N >= 8).
    out_dir : str | Path | None
        Folder for ``autoencoder.onnx`` + ``autoencoder.json``; None = a temporary folder.
    latent : int
        Size of the latent vector.
    epochs : int
        Passes over the crops.
    seed : int
        torch and numpy seed (deterministic on one machine).

    Returns
    -------
    AutoencoderEncoder

    Raises
    ------
    ImportError
        torch is not installed (``pip install stm-agent[export]``).
    ValueError
        Fewer than 8 crops.
    """
    import hashlib
    import tempfile

    import torch
    from torch import nn

    if len(grey) < 8:
        raise ValueError(f"the autoencoder needs at least 8 crops, got {len(grey)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(_inputs(grey))

    enc = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(32 * 6 * 6, latent))
    dec = nn.Sequential(nn.Linear(latent, 32 * 6 * 6), nn.ReLU(), nn.Unflatten(1, (32, 6, 6)),
                        nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 1, 3, padding=1))
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=2e-3)
    n = len(x)
    losses = []
    with torch.inference_mode(False):
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(n))
            tot = 0.0
            for i in range(0, n, 64):
                b = x[order[i:i + 64]]
                loss = nn.functional.mse_loss(dec(enc(b)), b)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(b)
            losses.append(tot / n)
        d = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="stm-ae-"))
        d.mkdir(parents=True, exist_ok=True)
        enc.eval()
        with torch.no_grad():
            torch.onnx.export(enc, (x[:2],), str(d / "autoencoder.onnx"), input_names=["crop"],
                              output_names=["latent"], dynamic_axes={"crop": {0: "n"}, "latent": {0: "n"}},
                              opset_version=17, dynamo=False)
    sha = hashlib.sha256((d / "autoencoder.onnx").read_bytes()).hexdigest()
    (d / "autoencoder.json").write_text(json.dumps({
        "latent": latent, "side": SIDE, "epochs": epochs, "seed": seed, "n_crops": int(n),
        "loss_first": losses[0], "loss_last": losses[-1], "sha256": sha,
        "input": "agent.discovery.canonical_pixels(grey, 24) * 4, shape (N, 1, 24, 24) float32",
    }, indent=1))
    return AutoencoderEncoder(d)
