"""Embedding duplicates (clean.embeddings): faiss search equals brute force, a planted crop-recolour copy is paired
by a small trained backbone and nothing else is, the clean stage groups the pair and keys on the threshold."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torchvision.transforms.v2 as T
from PIL import Image, ImageEnhance
from safetensors.torch import load_file, save_file

from pipeline.context import Context
from pipeline.core.artifacts import write_stamp
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.stages import clean
from pipeline.training import embeddings
from pipeline.training.models import IMAGENET

from .conftest import natural_image

SIZE, N_DISTINCT, PLANTED, BACKBONE, THRESHOLD = 32, 16, 5, "test_resnet", 0.8


def _random_unit(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[1:400:2] = x[0:400:2] + 0.4 * rng.standard_normal((200, d)).astype(np.float32)  # 200 planted close pairs
    return embeddings.normalise(x)


def _as_dict(i, j, s) -> dict:
    return dict(zip(zip(i.tolist(), j.tolist(), strict=True), s.tolist(), strict=True))


def test_faiss_search_equals_brute_force():
    x = _random_unit(3000, 64, 0)
    threshold = 0.3  # random 64-d pairs: similarity ~N(0, 1/8), so ~0.9% of 4.5M pairs above it, plus the planted
    found = _as_dict(*embeddings.similar_pairs(x, threshold))
    truth = _as_dict(*embeddings.brute_force_pairs(x, threshold))
    near_edge = {p for p, s in truth.items() if abs(s - threshold) < 1e-5}
    assert len(truth) > 30_000 and set(found) - near_edge == set(truth) - near_edge
    assert max(abs(found[p] - truth[p]) for p in set(found) & set(truth)) < 1e-5
    # the approximate index (used above EXACT_LIMIT): only true pairs, with their similarity, and every planted one
    approx = _as_dict(*embeddings.similar_pairs(x, 0.8, exact_limit=100))
    strong = _as_dict(*embeddings.brute_force_pairs(x, 0.8))
    assert set(approx) <= set(strong) and {(k, k + 1) for k in range(0, 400, 2)} <= set(approx)
    assert len(strong) == 200 and max(abs(approx[p] - strong[p]) for p in approx) < 1e-5


def _copy(im: Image.Image) -> Image.Image:
    """A 10% crop (5% off each side), resized back, less saturated and brighter."""
    w, h = im.size
    cropped = im.crop((round(0.05 * w), round(0.05 * h), round(0.95 * w), round(0.95 * h))).resize((w, h))
    return ImageEnhance.Brightness(ImageEnhance.Color(cropped).enhance(0.7)).enhance(1.1)


def _train_instance_model(images: list[Image.Image], steps: int = 40) -> dict:
    """A few steps of instance discrimination (each distinct image its own class, under random crops and colour
    jitter): weights that embed, made in the test because no pretrained weights are available offline."""
    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, num_classes=len(images))
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    aug = T.Compose([T.RandomResizedCrop(SIZE, scale=(0.7, 1.0), antialias=True), T.ColorJitter(0.2, 0.2, 0.3)])
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    y = torch.arange(len(images))
    mean, std = (torch.tensor(IMAGENET[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    for _ in range(steps):
        batch = (torch.stack([aug(im) for im in x]) - mean) / std
        loss = torch.nn.functional.cross_entropy(model(batch), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """A competition folder: 16 distinct pictures + a crop-recolour copy of one (same label); the weights file."""
    root = tmp_path_factory.mktemp("emb")
    data = root / "comp"
    (data / "img").mkdir(parents=True)
    images = [natural_image(300 + k, SIZE) for k in range(N_DISTINCT)]
    rows = []
    for k, im in enumerate(images):
        im.save(data / f"img/{k}.png")
        rows.append((f"img/{k}.png", "ab"[k % 2]))
    _copy(images[PLANTED]).save(data / "img/copy.png")
    rows.append(("img/copy.png", "ab"[PLANTED % 2]))
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(data / "train.csv", index=False)
    for t in range(2):
        natural_image(900 + t, SIZE).save(data / f"img/test{t}.png")
    pd.DataFrame({"image": [f"img/test{t}.png" for t in range(2)]}).to_csv(data / "test.csv", index=False)
    weights = root / "instance.safetensors"
    save_file(_train_instance_model(images), str(weights))
    return {"data": data, "weights": weights, "root": root}


def _source(weights: Path) -> embeddings.Source:
    return embeddings.Source(BACKBONE, weights, "", SIZE, 3, IMAGENET, "pretrained")


@pytest.mark.slow
def test_planted_copy_pairs_and_distinct_images_do_not(planted):
    data = planted["data"]
    paths = [str(data / f"img/{k}.png") for k in range(N_DISTINCT)] + [str(data / "img/copy.png")]
    model = embeddings.load_model(_source(planted["weights"]))
    vectors = embeddings.embed(model, paths, SIZE, 3, IMAGENET)
    assert vectors.shape == (17, model.num_features) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    i, j, sim = embeddings.similar_pairs(vectors, THRESHOLD)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(PLANTED, N_DISTINCT)]  # the copy, and nothing else
    others = vectors[:N_DISTINCT] @ vectors[:N_DISTINCT].T
    np.fill_diagonal(others, -1)
    assert sim[0] > THRESHOLD + 0.05 and others.max() < THRESHOLD - 0.05  # measured: 0.915, 0.60
    # random weights pair every image with every other: the reason weights are required
    random = timm.create_model(BACKBONE, num_classes=1).eval()
    assert len(embeddings.similar_pairs(embeddings.embed(random, paths, SIZE, 3, IMAGENET), THRESHOLD)[0]) == 17 * 8


def _ctx(planted, work: Path, *extra: str) -> Context:
    keys = [f"model.backbones=[{BACKBONE}]", f"train.image_size={SIZE}", "clean.workers=1",
            "clean.near_duplicates=false", "clean.embeddings=true", f"clean.embedding_threshold={THRESHOLD}", *extra]
    return Context(load_config(None, keys), planted["data"], work)


@pytest.mark.slow
def test_clean_stage_groups_the_embedding_pair_and_keys_on_the_threshold(planted, tmp_path: Path):
    work = tmp_path / "work"
    with pytest.raises(PipelineError, match="model.pretrained_path"):  # no weights anywhere: one line, the fix
        clean.run(_ctx(planted, work))
    ctx = _ctx(planted, work, f"model.pretrained_path={planted['weights']}")
    assert clean.run(ctx)["embedding_pairs"] == 1
    kept = pd.read_csv(work / "clean.csv")
    group = kept.set_index("id")["group"]
    assert group[f"img/{PLANTED}.png"] == group["img/copy.png"] and kept["group"].nunique() == N_DISTINCT
    pairs = pd.read_csv(work / "duplicates.csv")
    assert pairs[["id_a", "id_b", "kind"]].values.tolist() == [[f"img/{PLANTED}.png", "img/copy.png", "embedding"]]
    assert THRESHOLD < pairs["similarity"].iloc[0] <= 1 and pairs["distance"].iloc[0] == pytest.approx(
        1 - pairs["similarity"].iloc[0], abs=1e-6)
    html = (work / "report" / "clean.html").read_text()
    note = f"similarity {pairs['similarity'].iloc[0]:.3f}"
    assert html.count('class="group"') == 1 and note in html and "data:image/png;base64," in html
    assert clean.run(ctx) == {"skipped": True}
    higher = _ctx(planted, work, f"model.pretrained_path={planted['weights']}", "clean.embedding_threshold=0.9999")
    assert clean.run(higher)["embedding_pairs"] == 0  # reran: the threshold is in the key
    assert pd.read_csv(work / "clean.csv")["group"].nunique() == N_DISTINCT + 1


@pytest.mark.slow
def test_a_trained_fold_run_embeds_when_no_weights_file_is_given(planted, tmp_path: Path):
    work = tmp_path / "work"
    run = work / "runs" / BACKBONE / "fold0"
    run.mkdir(parents=True)
    save_file(load_file(str(planted["weights"])), str(run / "best.safetensors"))
    write_stamp(run / "best.json", "fp", backbone=BACKBONE, image_size=SIZE, in_chans=3, norm=IMAGENET)
    summary = clean.run(_ctx(planted, work))
    assert summary["embedding_pairs"] == 1
    assert clean.embedding_source(_ctx(planted, work)).kind == "fold"
