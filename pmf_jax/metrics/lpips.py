"""LPIPS (AlexNet, v0.1) through the reference ``lpips`` package, the network PIDM, CFLD and PCDMs report.

The package ships its linear heads; the AlexNet backbone is torchvision's ImageNet checkpoint
(``alexnet-owt-7be5be79.pth``), which the package would download. We build the model without the backbone and load
that file from a local folder instead (:mod:`pmf_jax.metrics.availability`), so nothing is fetched at run time.

Inputs are uint8 RGB mapped to [-1, 1] (``normalize=True``), as CFLD does. (PCDMs' released script passes [0, 1]
images without ``normalize``, which shifts its values; we follow the package's documented input range.)
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from pmf_jax.metrics.availability import MetricUnavailable, find_weights, require_modules

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE  # torchvision AlexNet_Weights.IMAGENET1K_V1


class LPIPS:
    """``LPIPS(weights_dir)(generated, reference) -> float32 [B]`` distances (lower is more similar).

    Raises:
      MetricUnavailable: on construction, when ``lpips``/``torch`` are not installed or the AlexNet file is absent.
    """

    name = "lpips"

    def __init__(self, weights_dir: Optional[os.PathLike] = None, device: Optional[str] = None):
        require_modules("LPIPS", ("torch", "torchvision", "lpips"))
        path = find_weights("LPIPS", ALEXNET_FILE, ALEXNET_URL, weights_dir)
        import lpips
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # pnet_rand: no backbone download; pretrained: the linear heads shipped inside the package.
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        load_alexnet_features(model.net, path)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.weights = str(path)

    def __call__(self, generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` pairs -> float32 ``[B]``."""
        import torch

        to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div(255.0)  # noqa: E731
        with torch.no_grad():
            d = self.model(to_tensor(generated).to(self.device), to_tensor(reference).to(self.device), normalize=True)
        return d.reshape(len(generated)).cpu().numpy().astype(np.float32)


def load_alexnet_features(net, path: os.PathLike) -> None:
    """Loads torchvision's AlexNet checkpoint (``features.<i>.*``) into lpips' sliced AlexNet (``slice<k>.<i>.*``).

    Raises:
      MetricUnavailable: the file is not an AlexNet checkpoint (missing or mis-shaped tensors).
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated download or a file of another kind
        raise MetricUnavailable("LPIPS", f"{path} is not a readable PyTorch checkpoint ({err})") from None
    mapped = {}
    for key, param in net.state_dict().items():
        _, index, leaf = key.split(".")  # slice3.6.weight -> features.6.weight
        source = f"features.{index}.{leaf}"
        if source not in state or state[source].shape != param.shape:
            raise MetricUnavailable("LPIPS", f"{path} is not torchvision's AlexNet checkpoint "
                                             f"(bad or missing {source})")
        mapped[key] = state[source]
    net.load_state_dict(mapped)
