"""Text-to-image path, first slice: captioned data, the latent model's parts (tiny, no download), cached encodings,
and AGC's skip rule on conditional latent losses."""

import numpy as np
import pytest
import torch

from fl_ietagc.data import latent
from fl_ietagc.data.captions import load_captioned
from fl_ietagc.settings.config import ConfigError
from fl_ietagc.training.agc import MemoryBank
from fl_ietagc.training.diffusion import Diffusion


def write_folder(root, n=4, size=(20, 12)):
    """n RGB images whose left half is colour i and right half white, captions 'image i'."""
    from tests.t2i_fixtures import write_pairs

    arrays = []
    for i in range(n):
        arr = np.full((size[1], size[0], 3), 255, np.uint8)
        arr[:, : size[0] // 2] = (10 * i, 20 * i, 30 * i)
        arrays.append(arr)
    return write_pairs(root, arrays, [f"  image   {i} " for i in range(n)], prefix="img")


def test_a_captioned_folder_loads_resized_and_centre_cropped(tmp_path):
    data = load_captioned(write_folder(tmp_path / "d"), size=8)
    assert data.images.shape == (4, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.captions == ["image 0", "image 1", "image 2", "image 3"]  # whitespace normalised
    # 20x12 -> shorter side 8 (13x8), centre crop 8 wide: columns 0-3 from the coloured half, 4-7 white
    img = data.images[3].numpy()
    assert (img[:, :, 0:2] == np.array([30, 60, 90])[:, None, None]).all()
    assert (img[:, :, 6:] == 255).all()
    assert len(data.subset([2, 0])) == 2 and data.subset([2, 0]).captions == ["image 2", "image 0"]


def test_a_csv_of_paths_and_captions(tmp_path):
    folder = write_folder(tmp_path / "d")
    (tmp_path / "list.csv").write_text("path,caption\nd/img1.png,one\nd/img0.png,zero\n")
    data = load_captioned(tmp_path / "list.csv", size=8)
    assert data.captions == ["one", "zero"] and data.files == ["d/img1.png", "d/img0.png"]
    assert torch.equal(data.images[1], load_captioned(folder, 8).images[0])


@pytest.mark.parametrize(
    "csv_text, message",
    [
        ("path\nd/img0.png\n", r"list.csv: no caption column \(one of text, caption\); columns: path"),
        ("path,caption\nd/img0.png,\n", r"list.csv: row 1 \(d/img0.png\): empty caption"),
        ("path,caption\nd/img0.png,a\nd/nope.png,b\n", r"list.csv: row 2: image d/nope.png not found"),
        ("path,caption\n../../etc/passwd,a\n", r"list.csv: row 1: ../../etc/passwd is outside the dataset folder"),
        ("path,caption\nd/bad.png,a\n", r"bad.png: not a readable image"),
        ("path,caption\n", r"list.csv: no rows"),
    ],
)
def test_bad_caption_data_is_named_by_file_and_row(tmp_path, csv_text, message):
    write_folder(tmp_path / "d")
    (tmp_path / "d" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "list.csv").write_text(csv_text)
    with pytest.raises(ConfigError, match=message):
        load_captioned(tmp_path / "list.csv", size=8)


def test_a_folder_without_metadata_and_a_missing_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: no metadata.jsonl or metadata.csv in the folder"):
        load_captioned(tmp_path / "empty", 8)
    with pytest.raises(ConfigError, match=r"nowhere: not found"):
        load_captioned(tmp_path / "nowhere", 8)
    (tmp_path / "m.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n[1, 2]\n')
    with pytest.raises(ConfigError, match=r"m.jsonl: line 2: not a JSON object"):
        load_captioned(tmp_path / "m.jsonl", 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    parts = latent.tiny_components(seed=0, image_size=16)
    directory = latent.save_components(parts, tmp_path_factory.mktemp("sd") / "tiny-sd")
    return parts, directory


def test_tiny_parts_save_and_load_as_a_local_checkpoint(tiny):
    parts, directory = tiny
    loaded = latent.load_components(directory)
    assert loaded.latent_shape == (4, 8, 8) and not any(p.requires_grad for p in loaded.vae.parameters())
    assert all(p.requires_grad for p in loaded.unet.parameters())
    ids = loaded.tokenizer(["a cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert ids[0, :4].tolist() == [
        0,
        parts.tokenizer.convert_tokens_to_ids("a</w>"),
        parts.tokenizer.convert_tokens_to_ids("c"),
        parts.tokenizer.convert_tokens_to_ids("a"),
    ]
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids).last_hidden_state, parts.text_encoder(ids).last_hidden_state)
    bf16 = latent.load_components(directory, frozen_dtype=torch.bfloat16)
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16 and next(bf16.unet.parameters()).dtype == torch.float32


def test_a_checkpoint_folder_missing_a_part_or_with_pickled_weights_is_refused(tiny, tmp_path):
    import shutil

    _, directory = tiny
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ConfigError, match=r"broken'?: no text_encoder/ folder"):
        latent.load_components(broken)
    pickled = tmp_path / "pickled"
    shutil.copytree(directory, pickled)
    for f in (pickled / "vae").glob("*.safetensors"):
        f.unlink()
    (pickled / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(
        ConfigError,
        match=r"vae/ has no .safetensors weights \(found diffusion_pytorch_model.bin: "
        r"pickled weights are refused",
    ):
        latent.load_components(pickled)


def test_encodings_are_computed_once_and_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path))
    parts, directory = tiny
    data = load_captioned(write_folder(tmp_path / "d", n=3, size=(16, 16)), size=16)
    key = latent.frozen_parts_key(directory, "fp32")
    lat, emb = latent.cached_encoding(data.images, data.captions, key, lambda: parts)
    assert lat.shape == (3, 4, 8, 8) and emb.shape == (3, 16, 32) and lat.dtype == emb.dtype == torch.float32
    files = list((tmp_path / "latents").glob("*.pt"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(latent, "encode", lambda *a, **k: calls.append(1))
    lat2, emb2 = latent.cached_encoding(data.images, data.captions, key, lambda: calls.append("load"))
    assert not calls and torch.equal(lat, lat2) and torch.equal(emb, emb2)
    assert not torch.equal(emb[0], emb[1])  # different captions, different embeddings
    # the key follows the frozen parts' files and dtype (not the UNet's, which trains)
    assert latent.frozen_parts_key(directory, "bf16") != key
    vae_file = next((directory / "vae").glob("*.safetensors"))
    vae_bytes = vae_file.read_bytes()
    try:
        vae_file.write_bytes(vae_bytes + b" ")
        assert latent.frozen_parts_key(directory, "fp32") != key
    finally:
        vae_file.write_bytes(vae_bytes)
    unet_file = next((directory / "unet").glob("*.safetensors"))
    before = unet_file.read_bytes()
    try:
        unet_file.write_bytes(before + b" ")
        assert latent.frozen_parts_key(directory, "fp32") == key
    finally:
        unet_file.write_bytes(before)


def test_agc_skips_conditional_latent_losses_by_the_same_rule(tiny):
    """The per-sample loss on latents with text conditioning feeds the unchanged memory bank: sample j is skipped
    iff l_j < M[t_j] / lambda, read before this step's update."""
    parts, _ = tiny
    torch.manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8)
    cond = torch.randn(6, 16, 32)
    t = torch.tensor([3, 3, 7, 7, 9, 9])
    noise = torch.randn_like(x0)
    diffusion = Diffusion(20)
    losses = diffusion.per_sample_loss(parts.unet, x0, t, noise, cond=cond)
    assert losses.shape == (6,) and losses.dtype == torch.float32
    other = diffusion.per_sample_loss(parts.unet, x0, t, noise, cond=torch.zeros_like(cond))
    assert not torch.allclose(losses, other)  # the text conditions the prediction
    bank = MemoryBank(20, lam=2.0)
    bank.values[3] = 4 * losses[0].double()  # threshold 2 x l_0 > l_0, l_1 (same t): both skipped if below
    bank.values[7] = 0.5 * losses[2].double()  # threshold 0.25 x l_2: kept
    expected = ~(losses.double() < bank.values[t] / 2.0)
    keep = bank.step(losses, t)
    assert torch.equal(keep, expected) and not keep[0] and keep[2]


def test_the_local_trainer_trains_the_conditional_latent_unet_with_agc_and_state(tiny, tmp_path, monkeypatch):
    """Two rounds of a client on cached latents + text embeddings: AGC skips, the state (Adam, bank, step) carries
    over, only the UNet changes, and a second identical client ends bit-identical (seeded)."""
    import copy

    from fl_ietagc.settings.config import parse_config
    from fl_ietagc.training.trainer import LocalTrainer, TrainState

    monkeypatch.setenv("FL_IETAGC_CACHE", str(tmp_path))
    parts, _ = tiny
    data = load_captioned(write_folder(tmp_path / "d", n=8, size=(16, 16)), size=16)
    lat, emb = latent.encode(parts, data.images, data.captions)
    cfg = parse_config(
        {"batch-size": 4, "diffusion-steps": 10, "agc-lambda": 1.05, "warmup-steps": 2, "hflip": "off", "lr": 1e-3}
    )

    def client():
        unet = copy.deepcopy(parts.unet)
        state = TrainState.fresh(np.arange(8))
        for r in (1, 2):
            trainer = LocalTrainer(cfg, unet, copy.deepcopy(unet), lat, state, torch.device("cpu"), cond=emb)
            stats = trainer.run(epochs=5, seed=r)
        return unet, state, stats

    unet, state, stats = client()
    assert state.step == 20 and state.rounds == 2 and state.bank["values"].abs().sum() > 0
    assert int(state.skip_counts.sum()) > 0 and stats.kept + stats.skipped == 10 * 4  # AGC skipped some samples
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, parts.unet.state_dict()[k])]
    assert changed  # the UNet trained; VAE and text encoder are not part of the client's model
    again, _, _ = client()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in unet.state_dict().items())
    with pytest.raises(ValueError, match="shard has 8 images but 7 text embeddings"):
        LocalTrainer(
            cfg, unet, copy.deepcopy(unet), lat, TrainState.fresh(np.arange(8)), torch.device("cpu"), cond=emb[:7]
        )
