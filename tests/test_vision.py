"""The vision family: MAE of a ViT with any FFN variant, image folders, and its runs (model=mae_*, data=images)."""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, group_options, read_jsonl, run_cli, start_cli, torchrun, train_losses, wait_for
from moa_train.budget import plan_run
from moa_train.builder import parameter_counts
from moa_train.config import validate_config
from moa_train.data.images import (
    BadFiles,
    ImageBatches,
    ImageSamples,
    ImageSplit,
    ImageValidation,
    is_validation_file,
    list_images,
    random_resized_crop,
    split_images,
)
from moa_train.errors import ConfigError, DataError
from moa_train.mae import MaskedAutoencoder, normalised_patches, patchify, sincos_2d, unpatchify

FFNS = group_options("ffn")


def write_images(folder, count: int, size: int = 40, seed: int = 0, layout: str = "classes") -> list:
    """Smooth random colour images (PNG and JPEG), in class sub-folders or flat."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.random((4, 4, 3))
        pixels = np.kron(coarse, np.ones((size // 4, size // 4, 1)))
        pixels = (255 * (0.7 * pixels + 0.3 * rng.random(pixels.shape))).astype(np.uint8)
        sub = folder / f"class{i % 3}" if layout == "classes" else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def tiny_cfg(*overrides: str):
    cfg = compose_config("model=mae_tiny", "data=images", *overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


def build(ffn: str = "gelu", *overrides: str) -> MaskedAutoencoder:
    cfg = tiny_cfg(f"ffn={ffn}", "ffn.kernel=eager", *overrides)
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg.model, cfg.ffn)
    model.init_weights()
    return model


# ----------------------------------------------------------------------------- the model


def test_vit_b16_counts_are_mae_reference_counts():
    """MAE's ViT-B/16: 85.6M encoder (the patch embedding, class token, 12 blocks, norm) and 26.0M decoder; here
    without the two FFN bias vectors per block (46,080 and 20,480 parameters)."""
    counts, _ = parameter_counts(compose_config("model=mae_vit_b16", "ffn=gelu", "data=images"))
    reference_encoder = 768 * 768 + 768 + 768 + 12 * (768 * 2304 + 2304 + 768 * 768 + 768 + 2 * 768 * 3072 + 3072
                                                      + 768 + 4 * 768) + 2 * 768
    reference_decoder = (768 * 512 + 512 + 512 + 8 * (512 * 1536 + 1536 + 512 * 512 + 512 + 2 * 512 * 2048 + 2048
                                                      + 512 + 4 * 512) + 2 * 512 + 512 * 768 + 768)
    assert abs(counts["encoder"] / reference_encoder - 1) < 0.001
    assert abs(counts["decoder"] / reference_decoder - 1) < 0.001
    assert counts["encoder"] == pytest.approx(85.8e6, rel=0.05) and counts["decoder"] == pytest.approx(26e6, rel=0.05)
    for ffn in ("qd_moa", "one_moa", "swiglu"):  # Type-II at the 8/3 width: the Type-I MLP's parameters
        other, _ = parameter_counts(compose_config("model=mae_vit_b16", f"ffn={ffn}", "data=images"))
        assert other["total"] == pytest.approx(counts["total"], rel=0.01), ffn


def test_dry_run_prints_encoder_and_decoder_counts():
    result = run_cli("model=mae_vit_b16", "ffn=qd_moa", "data=images", "dry_run=true")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["encoder"] == pytest.approx(85.8e6, rel=0.05)
    assert report["decoder"] == pytest.approx(26e6, rel=0.05)
    assert report["ffn_extra"] > 0 and report["encoder"] + report["decoder"] == report["total"]


@pytest.mark.parametrize("ffn", FFNS)
def test_every_ffn_variant_trains_inside_the_encoder_and_decoder(ffn):
    model = build(ffn)
    images, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    loss = model(images, noise)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    for block in (model.encoder[0], model.decoder[-1]):  # the variant sits in both halves and gets gradients
        grads = [p.grad for p in block.ffn.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    assert len(model.encoder) == 4 and len(model.decoder) == 2


def test_the_encoder_never_sees_masked_patches():
    model = build("qd_moa")
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    loss, prediction, mask = model(images, noise, return_prediction=True)
    assert mask.sum(1).tolist() == [48, 48]  # 75% of 64 patches
    changed = patchify(images, 4)
    changed[mask.bool()] += torch.randn_like(changed[mask.bool()])  # new pixels in the masked patches only
    changed = unpatchify(changed, 4, 3)
    loss2, prediction2, _ = model(changed, noise, return_prediction=True)
    assert torch.equal(prediction, prediction2)  # what the model predicts depends on the visible patches alone
    assert loss2 != loss  # while the loss scores the masked patches


def test_loss_is_the_masked_patches_error_against_normalised_pixels():
    model = build()
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    loss, prediction, mask = model(images, noise, return_prediction=True)
    target = normalised_patches(patchify(images, 4))
    per_patch = (prediction - target).pow(2).mean(-1)
    assert loss.item() == pytest.approx(((per_patch * mask).sum() / mask.sum()).item(), rel=1e-6)
    per_image = model(images, noise, reduction="none")
    assert per_image.shape == (2,) and per_image.mean().item() == pytest.approx(loss.item(), rel=1e-6)


def test_patchify_round_trip_and_position_table():
    images = torch.randn(2, 3, 32, 32)
    patches = patchify(images, 8)
    assert patches.shape == (2, 16, 192)
    assert torch.equal(patches[0, 1].view(8, 8, 3).permute(2, 0, 1), images[0, :, :8, 8:16])  # row 0, column 1
    assert torch.equal(unpatchify(patches, 8, 3), images)
    table = sincos_2d(16, 4)
    assert table.shape == (17, 16) and torch.equal(table[0], torch.zeros(16))
    assert torch.unique(table[1:], dim=0).shape[0] == 16  # every patch position distinct


def test_checkpoints_hold_no_fixed_position_embeddings():
    model = build()
    assert not any("pos_embed" in key for key in model.state_dict())
    before = model.pos_embed.clone()
    model.pos_embed.zero_()
    model.reset_buffers()
    assert torch.equal(model.pos_embed, before)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("overrides, key", [
    (["model.vision.patch_size=5"], "model.vision.patch_size"),
    (["model.vision.mask_ratio=1.0"], "model.vision.mask_ratio"),
    (["model.vision.decoder_heads=5"], "model.vision.decoder_heads"),
    (["data.images.crop_scale=[0.5,0.2]"], "data.images.crop_scale"),
    (["data.images.val_fraction=0"], "data.images.val_fraction"),
    (["budget.images=100", "budget.epochs=2"], "budget.images"),
    (["model.vision.channels=1"], "model.vision.channels"),
    (["model.ffn_hidden=128"], "model.ffn_hidden"),
    (["model.n_kv_heads=2"], "model.n_kv_heads"),
])
def test_bad_vision_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(tiny_cfg(*overrides))


def test_families_and_data_must_match(tmp_path):
    with pytest.raises(ConfigError, match="data.source.*vision model"):
        validate_config(compose_config("model=mae_tiny", "data=shakespeare"))
    with pytest.raises(ConfigError, match="data.source.*language model"):
        validate_config(compose_config("model=tiny", "data=images"))
    result = run_cli("model=mae_tiny", "data=images", "model.vision.patch_size=6", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "model.vision.patch_size" in result.stderr
    assert "Traceback" not in result.stderr and "e.g. 4, 8, 16, 32" in result.stderr


def test_budget_in_epochs_and_images():
    train = OmegaConf.create({"batch_size": 64, "micro_batch_size": None, "seq_len": 64, "max_steps": None})
    budget = OmegaConf.create({"tokens_per_param": 20, "count": "active", "images": None, "epochs": 2.5})
    plan = plan_run(train, budget, {"active": 10_000}, train_images=1000)
    assert plan.steps == math.ceil(2500 / 64) and plan.budget_images == 2500 and plan.budget_tokens == 2500 * 64
    with pytest.raises(ConfigError, match="budget.epochs"):  # epochs of a split nobody has read
        plan_run(train, budget, {"active": 10_000})
    budget.epochs, budget.images = None, 640
    assert plan_run(train, budget, {"active": 10_000}).steps == 10


def test_decoding_workers_do_not_name_another_run():
    from moa_train.config import run_name

    assert run_name(["data.images.workers=8"]) == "default"
    assert run_name(["data.images.flip=false"]) == "data.images.flip=False"  # augmentation is the run


def test_biases_and_tokens_are_never_decayed():
    from moa_train.optim import parameter_roles

    model = build("qd_moa")
    roles = {role: {id(p) for p in params} for role, params in parameter_roles(model).items()}
    for p in (model.output.bias, model.cls_token, model.mask_token, model.patch_embed.bias):
        assert id(p) in roles["vector"]
    assert id(model.output.weight) in roles["head"] and id(model.patch_embed.weight) in roles["matrix"]


def test_concurrent_first_uses_of_the_offline_set_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from moa_train.data.images import offline_image_set

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(offline_image_set, [tmp_path, tmp_path])
    assert first == second and (first / "COMPLETE").is_file()
    assert len(list_images(first)) == 1424
    assert [p.name for p in (tmp_path / "images").iterdir()] == [first.name]  # no partial copy left


# ----------------------------------------------------------------------------- image folders


def test_folders_flat_and_by_class_and_a_split_that_stays_put(tmp_path):
    write_images(tmp_path / "classes", 30)
    write_images(tmp_path / "flat", 30, layout="flat")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    assert len(list_images(tmp_path / "classes")) == 30
    assert list_images(tmp_path / "flat") == sorted(p.name for p in (tmp_path / "flat").glob("img*"))
    split = split_images(tmp_path / "classes", 0.2, None)
    assert len(split.train) + len(split.val) == 30 and not set(split.train) & set(split.val)
    assert all(is_validation_file(f, 0.2) for f in split.val)
    write_images(tmp_path / "classes", 60, seed=1)  # more files (and the first 30 rewritten): no file moves split
    grown = split_images(tmp_path / "classes", 0.2, None)
    assert set(split.val) <= set(grown.val) and set(split.train) <= set(grown.train)
    assert len(split_images(tmp_path / "classes", 0.5, 3).val) == 3  # max_val_images


def test_an_empty_folder_is_refused_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no image files in .*empty"):
        split_images(tmp_path / "empty", 0.1, None)
    result = run_cli("model=mae_tiny", "data=images", f"data.path={tmp_path / 'missing'}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "data.path" in result.stderr and "missing" in result.stderr


def samples(split, seed=0, validation=False, patch=4):
    return ImageSamples(split, 32, patch, 64, seed, (0.2, 1.0), True, validation)


def test_sample_k_is_fixed_by_k_and_the_seed(tmp_path):
    write_images(tmp_path, 20)
    split = split_images(tmp_path, 0.2, None)
    a, b = samples(split), samples(split)
    for k in (0, 5, 37):
        xa, za, _ = a[k]
        xb, zb, _ = b[k]
        assert torch.equal(xa, xb) and torch.equal(za, zb)
        assert xa.shape == (3, 32, 32) and za.shape == (64,)
        # the mask as each patch's rank: integers, a permutation of the patches
        assert za.dtype == torch.int64 and sorted(za.tolist()) == list(range(64))
    assert not torch.equal(a[3][0], samples(split, seed=1)[3][0])
    n = len(split.train)  # an epoch reads each training file once
    assert sorted(a._order(0).tolist()) == list(range(n)) and a._order(1).tolist() != a._order(0).tolist()
    val = samples(split, seed=7, validation=True)  # validation: centre crops and masks whatever train.seed is
    assert torch.equal(val[0][0], samples(split, seed=0, validation=True)[0][0])
    assert torch.equal(val[0][1], samples(split, seed=0, validation=True)[0][1])


def test_random_resized_crop_stays_in_the_image_and_the_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop(50, 30, rng, (0.2, 1.0))
        assert 0 <= left and left + w <= 50 and 0 <= top and top + h <= 30
        assert 0.2 * 1500 * 0.85 <= w * h <= 1500


class Plan:
    def __init__(self, batch_size, micro_batch_size, grad_accum):
        self.batch_size, self.micro_batch_size, self.grad_accum = batch_size, micro_batch_size, grad_accum


def test_batches_are_those_of_the_samples_with_workers_and_from_any_step(tmp_path):
    write_images(tmp_path, 16)
    split = split_images(tmp_path, 0.2, None)
    dataset, plan = samples(split), Plan(8, 2, 2)  # 2 ranks x 2 micro-batches of 2
    rank1 = ImageBatches(dataset, plan, 1, workers=2, bad=BadFiles(0))
    for step in (0, 1, 2):
        for micro in (0, 1):
            first = step * 8 + (1 * 2 + micro) * 2
            images, noise = rank1.samples(first, 2)
            assert torch.equal(images, torch.stack([dataset[first][0], dataset[first + 1][0]]))
            assert torch.equal(noise[1], dataset[first + 1][1])
    resumed = ImageBatches(dataset, plan, 1, workers=0, bad=BadFiles(0))  # a resumed run starts at its step
    assert torch.equal(resumed.samples(2 * 8 + 6, 2)[0], torch.stack([dataset[22][0], dataset[23][0]]))
    rank1.close()


def test_corrupt_and_too_small_files_are_skipped_by_name_up_to_a_limit(tmp_path, caplog):
    from PIL import Image

    write_images(tmp_path, 12, layout="flat")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (3, 3)).save(tmp_path / "speck.png")
    split = ImageSplit(tmp_path, list_images(tmp_path), [])
    assert "broken.png" in split.train and "speck.png" in split.train
    dataset = samples(split)
    bad = BadFiles(limit=2)
    with caplog.at_level(logging.WARNING, logger="moa_train"):
        for k in range(len(split.train)):
            image, _, skipped = dataset[k]
            assert image is not None
            bad.add(skipped)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "broken.png: cannot be decoded" in warned and "speck.png: 3x3 pixels, smaller than one 4-pixel" in warned
    with pytest.raises(DataError, match="more than data.images.max_bad_files=1.*broken.png"):
        strict = BadFiles(limit=1)
        for k in range(len(split.train)):
            strict.add(dataset[k][2])


def test_validation_pads_every_rank_to_the_same_batches(tmp_path):
    write_images(tmp_path, 40)
    split = split_images(tmp_path, 0.3, None)
    dataset = samples(split, validation=True)
    shares = [list(ImageValidation(dataset, 4, rank, 3, 0, BadFiles(0))) for rank in range(3)]
    assert len({len(s) for s in shares}) == 1
    weights = torch.cat([w for share in shares for _, _, w in share])
    assert weights.sum().item() == len(split.val)


# ----------------------------------------------------------------------------- runs

RUN = ["model=mae_tiny", "data=images", "ffn.kernel=eager", "train.progress=false", "data.images.workers=0",
       "train.batch_size=16", "train.eval_every=5"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root, 60)
    return root


@pytest.mark.slow
def test_mae_tiny_on_the_offline_set_learns_and_draws_its_reconstructions(tmp_path):
    """Acceptance 1: 100 steps of qd_moa on the offline set cut validation loss by more than 20%."""
    run_dir = tmp_path / "run"
    result = run_cli("model=mae_tiny", "ffn=qd_moa", "data=images", "train.max_steps=100", "train.eval_every=50",
                     "train.progress=false", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 100
    assert summary["val_loss"] < 0.8 * summary["initial_val_loss"]
    assert summary["data"]["source"] == "images" and summary["data"]["train_images"] > 1000
    figure = (run_dir / "reconstruction.png").read_bytes()
    assert figure.startswith(b"\x89PNG") and len(figure) > 10_000
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 50, 100]
    assert all("mix" in r for r in rows if "val_loss" in r)  # the gates' means, as for text
    assert rows[-1]["tokens"] == 100 * 64 * 64  # a token is a patch: 64 images of 64 patches a step


@pytest.mark.slow
def test_a_corrupt_file_is_warned_about_and_the_run_goes_on(folder, tmp_path):
    (folder / "class0" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    try:
        result = run_cli(*RUN, f"data.path={folder}", "train.max_steps=6", "data.images.val_fraction=0.05",
                         f"hydra.run.dir={tmp_path / 'run'}")
    finally:
        (folder / "class0" / "zz_corrupt.jpg").unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "zz_corrupt.jpg: cannot be decoded" in result.stderr


@pytest.mark.slow
def test_a_folder_of_unreadable_files_stops_the_run_naming_them(tmp_path):
    for i in range(20):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / f"x{i}.png").write_bytes(b"nope")
    result = run_cli(*RUN, f"data.path={tmp_path / 'bad'}", "train.max_steps=3", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert "none of the first 17 image files" in result.stderr and ".png: cannot be decoded" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_a_vision_run_bitwise(folder, tmp_path):
    steps = ["ffn=qd_moa", "train.max_steps=16", "train.ckpt_every=6", f"data.path={folder}",
             "data.images.workers=1"]
    reference = tmp_path / "uninterrupted"
    assert run_cli(*RUN, *steps, f"hydra.run.dir={reference}").returncode == 0
    run_dir = tmp_path / "killed"
    process = start_cli(*RUN, *steps, "train.ckpt_at_end=false", f"hydra.run.dir={run_dir}")
    wait_for(lambda: (run_dir / "checkpoints" / "step-6" / "meta.json").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = run_cli(*RUN, *steps, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert train_losses(run_dir) == train_losses(reference)  # bitwise, the images after step 6 unseen before
    assert len(train_losses(run_dir)) == 16
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] == ref_summary["val_loss"]
    # the language-model tools refuse a vision checkpoint by name, without a traceback
    export = subprocess.run([sys.executable, "-m", "moa_train.export", str(run_dir), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert export.returncode == 2 and "holds a vision model (model=mae_tiny" in export.stderr
    assert "Traceback" not in export.stderr and not (tmp_path / "x").exists()
    # its weights start another vision run (train.init_from)
    result = run_cli(*RUN, *steps, "train.max_steps=2", f"train.init_from={run_dir}",
                     f"hydra.run.dir={tmp_path / 'continued'}")
    assert result.returncode == 0 and "train.init_from" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_ddp_and_fsdp_train_a_vision_model_as_one_process_does(folder, tmp_path):
    """Two processes under torchrun (gloo), DDP and FSDP2: the one-process losses to float32 reduction order."""
    steps = ["ffn=qd_moa", "train.max_steps=6", "train.micro_batch_size=4", f"data.path={folder}"]
    assert run_cli(*RUN, *steps, f"hydra.run.dir={tmp_path / 'single'}").returncode == 0
    reference = read_jsonl(tmp_path / "single" / "metrics.jsonl")
    for mode in ("ddp", "fsdp"):
        run_dir = tmp_path / mode
        result = torchrun(*RUN, *steps, f"dist={mode}", f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-5000:]
        rows = read_jsonl(run_dir / "metrics.jsonl")
        assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in reference], rel=1e-5)
        assert [r.get("val_loss") for r in rows] == pytest.approx([r.get("val_loss") for r in reference], rel=1e-5)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["plan"]["world_size"] == 2 and summary["plan"]["grad_accum"] == 2
        assert (run_dir / "reconstruction.png").is_file()
