"""Shared builders for the text-to-image tests: captioned image folders and a tiny random CLIP (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_pairs(root: Path, arrays: list[np.ndarray], captions: list[str], prefix: str = "") -> Path:
    """A captioned folder (Hugging Face ImageFolder layout): <prefix>i.png and metadata.jsonl rows
    {file_name, text}."""
    root.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(root / f"{prefix}{i}.png")
    (root / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{prefix}{i}.png", "text": c}) for i, c in enumerate(captions))
    )
    return root


def save_tiny_clip(directory: Path, tokenizer):
    """A random tiny CLIPModel + CLIPProcessor (32 px images, `tokenizer`'s vocabulary) saved in safetensors;
    returns (model in eval mode, its image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config)
    model.save_pretrained(directory, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return model.eval(), image_processor
