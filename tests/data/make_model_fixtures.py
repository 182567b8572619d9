"""Write the old-checkpoint fixtures that tests/test_models_package.py loads.

The files in tests/data/models/ were written by this script with imret at commit 601bd50,
before the model layer became the ``imret.models`` package, so they are checkpoints and a
store as the earlier code saved them. Rerunning it with later code would only test that the
code agrees with itself; keep the files and rerun only to add new cases.

Run from the repository root: ``python tests/data/make_model_fixtures.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import imret
from imret.index.store import Store

OUT = Path(__file__).resolve().parent / "models"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 67, 83, generator=g)  # odd sizes: padding and pooling corners
    np.save(OUT / "input.npy", x.numpy())

    torch.manual_seed(1)
    resnet = imret.create_model("test_resnet", "gem", pretrained=False)
    with torch.no_grad():
        resnet.pool.p.fill_(2.5)

    torch.manual_seed(2)
    effnet = imret.create_model("test_efficientnet", "gem", whitening=32, pretrained=False,
                                pool_kwargs={"p": 3.0, "learn_p": False})
    with torch.no_grad():
        effnet.whiten.weight.normal_(generator=g)
        effnet.whiten.bias.normal_(generator=g)

    torch.manual_seed(3)
    rmac = imret.create_model("test_efficientnet", "rmac", pretrained=False, l2_before_whiten=False, whitening=16)
    with torch.no_grad():
        rmac.whiten.weight.normal_(generator=g)

    cases = {
        "test_resnet_gem.safetensors": resnet,
        "test_efficientnet_gem_whiten.pt": effnet,
        "test_efficientnet_rmac_whiten.safetensors": rmac,
    }
    for name, model in cases.items():
        model.eval()
        imret.save_model(model, OUT / name)
        with torch.inference_mode():
            np.save(OUT / (name.split(".")[0] + ".npy"), model(x).numpy())

    with Store.create(OUT / "store", effnet, model_source="fixture"):
        pass


if __name__ == "__main__":
    main()
