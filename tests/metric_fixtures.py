"""Small stand-ins for the metric networks, shared by the metric and eval tests: a random JAX feature network for
FID, random AlexNet weights in torchvision's checkpoint layout (LPIPS), and a tiny random local CLIP folder.

    from metric_fixtures import fake_alexnet, random_conv_features, tiny_clip
"""

import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax.metrics import FeatureExtractor
from pmf_jax.models.letter_tokenizer import write_letter_vocab


def random_conv_features(seed=0, dim=8) -> FeatureExtractor:
    """A small random conv net in JAX (stands in for Inception): 3x3 conv, ReLU, global mean -> [B, dim]."""
    kernel = jax.random.normal(jax.random.key(seed), (3, 3, 3, dim)) * 0.3

    @jax.jit
    def features(images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        y = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jax.nn.relu(y), axis=(1, 2))

    return FeatureExtractor(name=f"random-conv-{seed}", fn=lambda im: np.asarray(features(im)), batch_size=16)


def fake_alexnet(folder):
    """torchvision AlexNet ``features.*`` tensors, random (the LPIPS loader reads only those)."""
    import torch
    import torchvision

    from pmf_jax.metrics.lpips import ALEXNET_FILE

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in torchvision.models.alexnet(weights=None).features.state_dict().items()}
    torch.save(state, folder / ALEXNET_FILE)
    return folder


def tiny_clip(folder, seed=0):
    """A random transformers CLIP (32x32 images, letters-only tokenizer) saved as a local model folder."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_letter_vocab(folder, merge=None)  # bos 52, eos 53
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(seed)
    text = dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=52, eos_token_id=53, pad_token_id=53)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    return folder
