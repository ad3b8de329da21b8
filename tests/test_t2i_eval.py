"""Text-to-image evaluation: seeded DDIM sampling from captions (with classifier-free guidance), nearest-training-
image similarity under named embedders (SSCD TorchScript, pixel and latent fallbacks), CLIP score, pairs grid."""

import numpy as np
import pytest
import torch

from fl_ietagc.data import latent
from fl_ietagc.evaluation import t2i_eval as te
from fl_ietagc.settings.config import ConfigError
from fl_ietagc.training.diffusion import Diffusion

CAPTIONS = ["a red cat", "a blue dog", "three trees"]
STEPS = 4


@pytest.fixture(scope="module")
def parts():
    return latent.tiny_components(seed=0, image_size=16)


@pytest.fixture(scope="module")
def generated(parts):
    return te.sample_from_captions(parts, Diffusion(20), CAPTIONS, 2, steps=STEPS, seed=0, batch_size=4)


@pytest.fixture(scope="module")
def train():
    return torch.randint(
        0, 256, (len(CAPTIONS), 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )


def test_samples_are_uint8_caption_major_and_seeded_per_caption_and_seed(parts, generated):
    images, index = generated
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert index.tolist() == [0, 0, 1, 1, 2, 2]
    assert parts.unet.training  # restored after sampling
    again, _ = te.sample_from_captions(parts, Diffusion(20), CAPTIONS, 2, steps=STEPS, seed=0, batch_size=4)
    assert torch.equal(images, again)
    other, _ = te.sample_from_captions(parts, Diffusion(20), CAPTIONS, 2, steps=STEPS, seed=1, batch_size=4)
    assert all(not torch.equal(a, b) for a, b in zip(images, other))
    assert not torch.equal(images[0], images[1])  # two seeds of one caption
    # each image's noise is its own: batches of one give the same images as batches of four
    alone, _ = te.sample_from_captions(parts, Diffusion(20), CAPTIONS, 2, steps=STEPS, seed=0, batch_size=1)
    assert (alone.int() - images.int()).abs().max() <= 1
    # a diffusers scheduler config with the same betas samples the same images
    from_config, _ = te.sample_from_captions(
        parts, Diffusion(20).scheduler_config, CAPTIONS, 2, steps=STEPS, seed=0, batch_size=4
    )
    assert torch.equal(images, from_config)
    with pytest.raises(ValueError, match="nothing to sample: 0 captions x 1 seeds"):
        te.sample_from_captions(parts, Diffusion(20), [], 1)


@torch.no_grad()
def test_guidance_scale_one_is_plain_conditional_ddim_and_zero_is_the_empty_caption(parts, generated):
    images, _ = generated
    sched = te.ddim_for(Diffusion(20))
    sched.set_timesteps(STEPS)
    parts.unet.eval()
    x = torch.randn(parts.latent_shape, generator=torch.Generator().manual_seed(te.image_seed(0, 2, 1)))[None]
    cond = te.text_embeddings(parts, [CAPTIONS[2]], "cpu")
    for t in sched.timesteps:
        x = sched.step(parts.unet(x, t, encoder_hidden_states=cond).sample, t, x, eta=0.0).prev_sample
    parts.unet.train()
    assert torch.equal(te.decode(parts, x)[0], images[5])
    # g = 0 keeps only eps(empty caption): the unguided samples of the caption ""
    unconditional, _ = te.sample_from_captions(parts, Diffusion(20), CAPTIONS, 2, steps=STEPS, guidance_scale=0.0)
    empty, _ = te.sample_from_captions(parts, Diffusion(20), [""] * 3, 2, steps=STEPS)
    assert (unconditional.int() - empty.int()).abs().max() <= 1
    guided, _ = te.sample_from_captions(parts, Diffusion(20), CAPTIONS, 2, steps=STEPS, guidance_scale=5.0)
    assert (guided.float() - images.float()).abs().mean() > 1


@pytest.mark.parametrize("make", [lambda parts: te.PixelEmbedder(), lambda parts: te.LatentEmbedder(parts)])
def test_a_planted_training_image_is_found_with_similarity_one_and_its_own_caption(parts, generated, train, make):
    images, index = generated
    embedder = make(parts)
    queries = torch.cat([images, train[2:3], train[0:1]])
    caption_idx = torch.cat([index, torch.tensor([2, 1])])  # train[0] planted under another image's caption
    scores = te.memorization_scores(queries, caption_idx, train, embedder)
    assert scores.embedder == embedder.name in ("pixel-cosine", "latent-cosine")
    assert scores.similarity[-2] == pytest.approx(1.0, abs=1e-5) and scores.nearest[-2] == 2 and scores.own_caption[-2]
    assert scores.similarity[-1] == pytest.approx(1.0, abs=1e-5) and scores.nearest[-1] == 0
    assert not scores.own_caption[-1]
    assert (scores.similarity[:-2] < 1 - 1e-3).all()
    assert np.array_equal(scores.own_caption, scores.nearest == caption_idx.numpy())
    assert scores.summary()["embedder"] == embedder.name


class TableEmbedder:
    """Embeds an image as a fixed 2-vector chosen by its first pixel: known similarities."""

    name = "table"
    TABLE = {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [1.0, 0.0], 3: [0.6, 0.8], 4: [-1.0, 0.0]}

    def __call__(self, images):
        return torch.tensor([self.TABLE[int(im[0, 0, 0])] for im in images])


def test_the_summary_reports_mean_threshold_fraction_and_95th_percentile():
    def imgs(codes):
        return torch.tensor(codes, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)

    scores = te.memorization_scores(imgs([2, 3, 4]), [0, 0, 1], imgs([0, 1]), TableEmbedder(), threshold=0.5)
    assert np.allclose(scores.similarity, [1.0, 0.8, 0.0]) and scores.nearest.tolist() == [0, 1, 1]
    assert scores.own_caption.tolist() == [True, False, True]
    s = scores.summary()
    assert s["embedder"] == "table" and s["num_generations"] == 3 and s["count_above"] == 2
    assert s["mean_top1"] == pytest.approx(0.6) and s["fraction_above"] == pytest.approx(2 / 3)
    assert s["q95_top1"] == pytest.approx(0.98) and s["fraction_nearest_own_caption"] == pytest.approx(2 / 3)
    strict = te.memorization_scores(imgs([2, 3, 4]), [0, 0, 1], imgs([0, 1]), TableEmbedder(), threshold=0.9)
    assert strict.summary()["fraction_above"] == pytest.approx(1 / 3)


class SSCDStandIn(torch.nn.Module):
    """A scripted stand-in for SSCD: checks the 320 x 320 input, returns un-normalised spatial features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 40, stride=40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[2] == 320 and x.shape[3] == 320
        return self.conv(x).flatten(1) * 3.0


# the stand-in file is made as SSCD's release was, with torch.jit.script / save (deprecated in torch 2.14); loading it
# (the product's part) must stay silent
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.(script|save)` is deprecated:FutureWarning")
def test_a_torchscript_model_works_as_the_sscd_embedder(tmp_path, generated, train):
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(SSCDStandIn()), str(path))
    embedder = te.SSCDEmbedder(path)
    grey = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    x = embedder.preprocess(grey)
    assert x.shape == (1, 3, 320, 320)
    assert torch.allclose(x[0, :, 5, 5], (1 - torch.tensor(te.IMAGENET_MEAN)) / torch.tensor(te.IMAGENET_STD))
    emb = embedder(train)
    assert emb.shape == (3, 128) and torch.allclose(emb.norm(dim=1), torch.ones(3))
    images, index = generated
    scores = te.memorization_scores(
        torch.cat([images, train[1:2]]), torch.cat([index, torch.tensor([1])]), train, embedder
    )
    assert scores.embedder == "sscd" and scores.summary()["embedder"] == "sscd"
    assert scores.similarity[-1] == pytest.approx(1.0, abs=1e-5) and scores.nearest[-1] == 1
    assert scores.own_caption[-1]


def test_a_missing_or_invalid_sscd_model_is_named_in_one_line(tmp_path):
    missing = tmp_path / "nope.torchscript.pt"
    with pytest.raises(ConfigError, match=r"SSCD model '.*nope\.torchscript\.pt': not found") as e:
        te.SSCDEmbedder(missing)
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    state_dict = tmp_path / "weights.torchvision.pt"
    torch.save({"w": torch.zeros(2)}, state_dict)  # a zip archive, but pickled weights, not TorchScript
    for bad in (junk, state_dict):
        with pytest.raises(ConfigError, match=rf"SSCD model '.*{bad.name}': not a TorchScript archive") as e:
            te.SSCDEmbedder(bad)
        assert "\n" not in str(e.value)


def test_the_clip_score_formula_on_known_vectors():
    image = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 4.0]])
    text = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [6.0, 8.0]])
    assert torch.allclose(te.clip_score_from_embeddings(image, text), torch.tensor([100 / 2**0.5, 0.0, 100.0]))


@pytest.fixture(scope="module")
def tiny_clip(parts, tmp_path_factory):
    from tests.t2i_fixtures import save_tiny_clip

    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model, image_processor = save_tiny_clip(d, parts.tokenizer)
    return model, image_processor, d


@torch.no_grad()
def test_clip_score_from_a_local_tiny_clip(tiny_clip, generated, parts):
    model, image_processor, d = tiny_clip
    images, index = generated
    captions = [CAPTIONS[i] for i in index]
    scores = te.clip_score(images, captions, d, batch_size=4)
    assert scores.shape == (6,) and ((scores >= 0) & (scores <= 100)).all()
    pixels = image_processor([im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt").pixel_values
    ids = parts.tokenizer(captions, padding=True, return_tensors="pt")
    out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert torch.allclose(scores, 100 * cos.clamp(min=0), atol=1e-4)
    assert not torch.allclose(scores, te.clip_score(images, captions[::-1], d))  # the caption matters


def test_clip_score_without_a_usable_directory_names_it(tmp_path, generated):
    images, _ = generated
    with pytest.raises(ConfigError, match=r"CLIP directory '.*nowhere': not a directory"):
        te.clip_score(images, ["a"] * 6, tmp_path / "nowhere")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ConfigError, match=r"CLIP directory '.*pickled': no .safetensors weights"):
        te.clip_score(images, ["a"] * 6, tmp_path / "pickled")


def test_the_similar_pairs_grid_is_written(tmp_path, generated, train):
    images, index = generated
    scores = te.memorization_scores(images, index, train, te.PixelEmbedder())
    path = te.similar_pairs_grid(
        images, train, scores.nearest, scores.similarity, tmp_path / "fig" / "pairs.png", n=4, metric=scores.embedder
    )
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    width, height = Image.open(path).size
    assert height > width  # four rows of (generation, training image)
