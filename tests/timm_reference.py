"""The PyTorch side of the timm interop tests, run in its own process.

torch (through triton) and TensorFlow crash when loaded into one interpreter, so the tests
call this script: `python timm_reference.py REQUEST.json` reads the request, runs timm, and
writes the requested arrays to the `.npy` paths it names.
"""

import json
import sys
from functools import partial

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import create_model, vision_transformer


def logits(npz_path: str, images: np.ndarray, tanh_gelu: bool, **kwargs) -> np.ndarray:
    """timm's vit_tiny_patch16_224 loaded with timm's own npz loader, applied to images."""
    if tanh_gelu:
        kwargs["act_layer"] = partial(torch.nn.GELU, approximate="tanh")
    model = create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    vision_transformer._load_weights(model, npz_path)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def main(request_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    if request["kind"] == "logits":
        images = np.load(request["images"])
        out = logits(request["npz"], images, request["tanh_gelu"], **request["timm_kwargs"])
    else:
        posemb = torch.from_numpy(np.load(request["posemb"]))
        out = resample_abs_pos_embed(posemb, request["grid"], num_prefix_tokens=1).numpy()
    np.save(request["output"], out)


if __name__ == "__main__":
    main(sys.argv[1])
