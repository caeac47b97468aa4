"""The segmentation track's config (`segment.*`), one section per part of the stage (pipeline/stages/segment.py),
so that each step's cache key holds exactly the sections it reads:

- a member's fold model: data's masks and images, that member's entry of models, train, folds (and which images
  the fold holds out): changing or adding a member retrains no other
- its out-of-fold and test probabilities: the model's key and views
- views, the blend, thresholds and the submission: recomputed on every run from the stored probabilities
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.config.schema import SAFE_NAME, Section, SpecError, _own

ARCHITECTURES = ("unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet", "pspnet", "manet", "pan")


class SegmentDataConfig(Section):
    train_csv: str = Field("train.csv", description="training ids and masks (wide, long or combined RLE, or the ids "
                                                    "of mask PNGs; docs/segmentation.md)")
    test_csv: str = Field("test.csv", description="images to segment (the id column)")
    masks_dir: str = Field("masks", description="folder of mask PNGs inside DATA (the two PNG forms)")


class SegmentMemberConfig(Section):
    """One member of segment.models: a network trained on every fold, its maps blended with the others'."""

    name: str | None = Field(None, description="its folder WORK/segment/<name> and its leaderboard rows; null: "
                                                "<arch>-<encoder>")
    arch: Literal[ARCHITECTURES] = Field("unet", description="segmentation_models_pytorch architecture")
    encoder: str = Field("resnet18", description="its encoder: an smp name (resnet18, efficientnet-b0) or a timm "
                                                 "model as tu-<name> (tu-resnet10t)")
    encoder_weights: str | None = Field(None, description="smp's pretrained encoder weights (imagenet; downloads "
                                                          "from the hub); null: random init")
    pretrained_path: str | None = Field(None, description="local state dict (.safetensors, .pt, .pth) of the whole "
                                                          "model or of its encoder, loaded before training")

    @property
    def label(self) -> str:
        return self.name or f"{self.arch}-{self.encoder}"


class SegmentTrainConfig(Section):
    image_size: int = Field(256, ge=32, multiple_of=32, description="images and masks are resized once to "
                                                                     "image_size x image_size (a multiple of 32: "
                                                                     "the encoders halve it five times)")
    epochs: int = _own("epochs", 20, "most training epochs per fold")
    batch_size: int = _own("batch_size", 16, "images per update")
    lr: float = _own("lr", 1e-3, "AdamW learning rate, cosine down to lr/100 over the epochs")
    weight_decay: float = _own("weight_decay", 1e-4, "AdamW weight decay")
    hflip: bool = _own("hflip", True, "random horizontal flips of images and their masks")
    vflip: bool = Field(False, description="random vertical flips of images and their masks")
    loss: Literal["dice_bce", "dice", "bce"] = Field("dice_bce", description="soft Dice (per class, over the "
                                                                             "batch) plus binary cross-entropy, "
                                                                             "or either alone")
    patience: int | None = Field(5, ge=1, description="stop after this many epochs without a better validation "
                                                      "Dice and keep the best epoch's weights; null: train every "
                                                      "epoch, keep the last")
    seed: int = _own("seed", 0, "seed of weights init, batch order, flips and the folds")


class SegmentFoldsConfig(Section):
    n_splits: int = Field(5, ge=2, description="one model per fold; folds stratified on which classes an image "
                                               "holds, duplicate groups of WORK/clean.csv kept together")


class SegmentViewsConfig(Section):
    hflip: bool = Field(True, description="try the mirrored view (averaged with the plain one) on OOF; kept when "
                                          "it raises OOF Dice")
    vflip: bool = Field(False, description="try the upside-down view the same way")


class SegmentThresholdsConfig(Section):
    probability: list[float] = Field([0.3, 0.4, 0.5, 0.6, 0.7], min_length=1,
                                     description="per-class probability thresholds tried on OOF Dice")
    min_area: list[int] = Field([0, 16, 64, 256], min_length=1,
                                description="per-class smallest connected component kept, in pixels at image_size "
                                            "(scaled to each image's own size in the submission), tried on OOF Dice")


class SegmentBlendConfig(Section):
    steps: int = Field(10, ge=1, description="several members: weights tried on OOF Dice in multiples of 1/steps "
                                             "(each member alone and the mean too); the blend and the "
                                             "post-processing are nested over the folds")


class SegmentPredictConfig(Section):
    chunk: int = Field(256, ge=1, description="test images turned into RLE at a time (bounds memory)")
    gallery_images: int = Field(6, ge=0, description="OOF images in gallery_oof.png (image, truth, prediction)")


class SegmentConfig(Section):
    data: SegmentDataConfig = Field(SegmentDataConfig(), description="the segmentation folder's files")
    models: list[SegmentMemberConfig] = Field(
        [SegmentMemberConfig(name="unet-r18")], min_length=1,
        description="the members, each {name, arch, encoder, encoder_weights, pretrained_path}, trained per fold; "
                    "several: their maps blended (docs/segmentation.md)")
    train: SegmentTrainConfig = Field(SegmentTrainConfig(), description="training (AdamW, cosine)")
    folds: SegmentFoldsConfig = Field(SegmentFoldsConfig(), description="cross-validation folds")
    views: SegmentViewsConfig = Field(SegmentViewsConfig(), description="test-time flips, chosen on OOF")
    thresholds: SegmentThresholdsConfig = Field(SegmentThresholdsConfig(), description="post-processing grids "
                                                                                      "chosen on OOF, nested")
    blend: SegmentBlendConfig = Field(SegmentBlendConfig(), description="the blend of several members, chosen "
                                                                       "on OOF, nested")
    predict: SegmentPredictConfig = Field(SegmentPredictConfig(), description="submission and gallery")

    @model_validator(mode="after")
    def _member_names(self) -> SegmentConfig:
        """A member's name is a safe folder name, one member's only (ignoring case, as some file systems do)."""
        seen: dict[str, int] = {}
        for i, member in enumerate(self.models):
            name = member.label
            if not SAFE_NAME.match(name):
                raise SpecError(f"segment.models[{i}]: name {name!r} is not a safe folder name (letters, digits, "
                                "'.', '_', '-'; up to 100 characters); rename it")
            if name.lower() in seen:
                raise SpecError(f"segment.models[{i}]: name {name!r} is also segment.models[{seen[name.lower()]}]'s; "
                                "give one of them another name")
            seen[name.lower()] = i
        return self
