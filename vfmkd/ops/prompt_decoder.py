"""SAM's and SAM 2's prompt encoder and mask decoder, built at the official sizes and run on given features.

Two users share this module: the student's promptable mask head
(:mod:`vfmkd.models.heads.sam_mask_head`) builds its own official prompt encoder and
decoder here, and prompt-in-the-loop distillation (:mod:`vfmkd.distillation.mask_kd`) runs
a SAM-family *teacher's* prompt encoder and decoder on the teacher's image embedding, live
or read from a feature store. :class:`PromptDecoder` is the latter: ``decode`` is what
``SamPredictor.predict_torch`` / ``SAM2ImagePredictor._predict`` compute after the image
encoder, before upscaling, for one image.

Decoder-only loading (:meth:`PromptDecoder.from_checkpoint`) reads only the
``prompt_encoder.*`` / ``mask_decoder.*`` (SAM) or ``sam_prompt_encoder.*`` /
``sam_mask_decoder.*`` (SAM 2) entries of an official checkpoint, so a run whose teacher
features all come from a store never builds the teacher's image encoder.

Coordinates are the official predictors' after their ``transform``: teacher-input pixels,
the prompt encoder adding half a pixel itself. vfmkd's continuous coordinates (a pixel
centre at ``i + 0.5``) are turned into them by subtracting 0.5
(:func:`to_official_coordinates`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from vfmkd.utils.state_dict import load_state_dict_strict

__all__ = [
    "FAMILIES",
    "LOW_RES_LOGIT_LIMIT",
    "PromptDecoder",
    "checkpoint_state",
    "load_prompt_modules",
    "official_prompt_modules",
    "prompt_count",
    "prompt_family",
    "to_official_coordinates",
]

FAMILIES = ("sam", "sam2")
#: Official module prefixes in each family's checkpoint.
CHECKPOINT_PREFIXES = {
    "sam": ("prompt_encoder.", "mask_decoder."),
    "sam2": ("sam_prompt_encoder.", "sam_mask_decoder."),
}
#: ``SAM2ImagePredictor`` clamps low-resolution logits to this range.
LOW_RES_LOGIT_LIMIT = 32.0
#: The decoder inputs of each family, as the teachers name their features.
DECODER_FEATURES = {"sam": ("embed",), "sam2": ("embed", "hires_s8", "hires_s4")}
EMBED_STRIDE = 16


def prompt_family(teacher_name: str) -> str | None:
    """``sam`` or ``sam2`` for a SAM-family teacher's registry name (``sam_vit_b``, ``sam2.1_hiera_t``), else None."""
    name = teacher_name.lower()
    if name.startswith("sam2"):
        return "sam2"
    if name == "sam" or name.startswith("sam_"):
        return "sam"
    return None


def to_official_coordinates(values: torch.Tensor) -> torch.Tensor:
    """vfmkd pixel coordinates (centres at ``i + 0.5``) as SAM's prompt encoders take them."""
    return values - 0.5


def official_prompt_modules(
    family: str,
    *,
    image_size: int = 1024,
    embed_dim: int = 256,
    depth: int = 2,
    mlp_dim: int = 2048,
    predictor_postprocessing: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """The official prompt encoder and mask decoder of a family, at its published sizes by default.

    Args:
        family: ``sam`` (``segment_anything``) or ``sam2``.
        image_size: the square network input the prompt encoder's grid follows.
        embed_dim: transformer width (official: 256).
        depth: two-way transformer layers (official: 2).
        mlp_dim: their MLP width (official: 2048).
        predictor_postprocessing: SAM 2 only: ``build_sam2``'s default for inference (a
            single requested mask falls back to the most stable of the multimask outputs
            when it is unstable), as the official predictor runs it.
    """
    if family not in FAMILIES:
        raise ValueError(f"prompt decoder family must be one of {FAMILIES}, got '{family}'")
    # NOTE: imported here: segment_anything and sam2 are only needed when one is built.
    if family == "sam":
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        family_settings: dict[str, Any] = {}
    else:
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer

        # NOTE: the settings of the SAM 2 / 2.1 model configs (sam2.1_hiera_*.yaml) and of
        # build_sam2's apply_postprocessing.
        family_settings = dict(
            use_high_res_features=True,
            iou_prediction_use_sigmoid=True,
            pred_obj_scores=True,
            pred_obj_scores_mlp=True,
            use_multimask_token_for_obj_ptr=True,
        )
        if predictor_postprocessing:
            family_settings.update(
                dynamic_multimask_via_stability=True,
                dynamic_multimask_stability_delta=0.05,
                dynamic_multimask_stability_thresh=0.98,
            )
    grid = image_size // EMBED_STRIDE
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=depth, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=8),
        transformer_dim=embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        **family_settings,
    )
    return prompt_encoder, mask_decoder


def checkpoint_state(path: str | Path) -> Mapping[str, torch.Tensor]:
    """The state dict of an official SAM / SAM 2 checkpoint file (a plain state dict or ``{"model": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not an official SAM / SAM 2 state dict")
    nested = loaded.get("model")
    return nested if isinstance(nested, Mapping) else loaded


def load_prompt_modules(
    family: str, state: Mapping[str, torch.Tensor], prompt_encoder: nn.Module, mask_decoder: nn.Module, *, source: str
) -> None:
    """Load a checkpoint's prompt encoder and mask decoder entries into the modules, strictly."""
    for prefix, module in zip(CHECKPOINT_PREFIXES[family], (prompt_encoder, mask_decoder)):
        part = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        load_state_dict_strict(
            module,
            part,
            source=f"{source} ({prefix}*)",
            hint=f"Is it an official {'SAM 2' if family == 'sam2' else 'SAM'} checkpoint?",
        )


class PromptDecoder(nn.Module):
    """A SAM-family model's prompt encoder and mask decoder, run on its image features.

    Args:
        family: ``sam`` or ``sam2``.
        prompt_encoder: the official ``PromptEncoder``.
        mask_decoder: the official ``MaskDecoder``.
    """

    def __init__(self, family: str, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"prompt decoder family must be one of {FAMILIES}, got '{family}'")
        self.family = family
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The image features :meth:`decode` takes (the teachers' feature names)."""
        return DECODER_FEATURES[self.family]

    @property
    def image_size(self) -> int:
        """Side of the square teacher input the prompt coordinates refer to."""
        return int(self.prompt_encoder.input_image_size[0])

    @classmethod
    def from_checkpoint(cls, family: str, path: str | Path, *, image_size: int = 1024) -> "PromptDecoder":
        """The prompt encoder and decoder of an official checkpoint, without its image encoder (eval mode, frozen)."""
        prompt_encoder, mask_decoder = official_prompt_modules(
            family, image_size=image_size, predictor_postprocessing=True
        )
        load_prompt_modules(family, checkpoint_state(path), prompt_encoder, mask_decoder, source=str(path))
        return cls(family, prompt_encoder, mask_decoder).eval().requires_grad_(False)

    def decode(
        self,
        features: Mapping[str, torch.Tensor],
        *,
        image_index: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
        clamp: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits and predicted IoUs of N prompts on B images.

        SAM 2's decoder takes every prompt in one call (each with its image's maps); SAM's
        repeats one image per call, so its prompts are decoded image by image.

        Args:
            features: ``embed [B, 256, S / 16, S / 16]`` (SAM 2 also ``hires_s8 [B, 64, S / 8,
                S / 8]`` and ``hires_s4 [B, 32, S / 4, S / 4]``).
            image_index: ``[N]`` the image of each prompt (default: all on image 0).
            boxes: ``[N, 4]`` xyxy, official coordinates (see the module docstring).
            points: ``(coords [N, K, 2], labels [N, K])``, labels 1 / 0 / -1 (padding).
            mask_input: ``[N, 1, S / 4, S / 4]`` previous low-resolution logits.
            multimask: three masks per prompt, else one.
            clamp: SAM 2: clamp the logits to +-32 as its predictor does (a student in
                training passes False).

        Returns:
            ``[N, M, S / 4, S / 4]`` logits and ``[N, M]`` IoUs, ``M`` 3 or 1.
        """
        missing = [name for name in self.feature_names if name not in features]
        if missing:
            raise ValueError(
                f"the {self.family} prompt decoder needs the features {list(self.feature_names)}; missing {missing}"
            )
        embedding = features["embed"]
        device = embedding.device
        # NOTE: no prompt at all: the official decoders then decode the image alone, once.
        count = prompt_count({"boxes": boxes, "points": points, "mask_input": mask_input}) or 1
        if image_index is None:
            image_index = torch.zeros(count, dtype=torch.int64, device=device)
        # NOTE: the prompt encoder's grid follows the embedding (any input that is a multiple of
        # 16 works); at the model's own input size these are its values.
        grid = (int(embedding.shape[-2]), int(embedding.shape[-1]))
        self.prompt_encoder.image_embedding_size = grid
        self.prompt_encoder.input_image_size = (grid[0] * EMBED_STRIDE, grid[1] * EMBED_STRIDE)
        if points is not None:
            points = (points[0].to(device, torch.float32), points[1].to(device, torch.int))
        if boxes is not None:
            boxes = boxes.to(device, torch.float32)
        if mask_input is not None:
            mask_input = mask_input.to(device, embedding.dtype)
        if self.family == "sam":
            return self._decode_per_image(embedding, image_index.to(device), boxes, points, mask_input, multimask)
        points = _boxes_as_points(boxes, points)
        sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=mask_input)
        image_index = image_index.to(device)
        masks, iou, _, _ = self.mask_decoder(
            image_embeddings=embedding[image_index],
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=[features["hires_s4"][image_index], features["hires_s8"][image_index]],
        )
        return (masks.clamp(-LOW_RES_LOGIT_LIMIT, LOW_RES_LOGIT_LIMIT) if clamp else masks), iou

    def _decode_per_image(
        self,
        embedding: torch.Tensor,
        image_index: torch.Tensor,
        boxes: torch.Tensor | None,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        mask_input: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM: one decoder call per image, results put back in prompt order."""
        dense_pe = self.prompt_encoder.get_dense_pe()
        all_masks: list[torch.Tensor] = []
        all_iou: list[torch.Tensor] = []
        rows_of: list[torch.Tensor] = []
        for image in image_index.unique().tolist():
            rows = (image_index == image).nonzero().flatten()
            sparse, dense = self.prompt_encoder(
                points=None if points is None else (points[0][rows], points[1][rows]),
                boxes=None if boxes is None else boxes[rows],
                masks=None if mask_input is None else mask_input[rows],
            )
            masks, iou = self.mask_decoder(
                image_embeddings=embedding[image : image + 1],
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            all_masks.append(masks)
            all_iou.append(iou)
            rows_of.append(rows)
        order = torch.cat(rows_of).argsort()
        return torch.cat(all_masks)[order], torch.cat(all_iou)[order]


def prompt_count(prompts: Mapping[str, Any]) -> int:
    """How many prompts a prompt dict holds: rows of the first of ``boxes``, ``points`` (a tensor,
    or decode's ``(coords, labels)`` pair) and ``mask_input`` that is present; 0 when none is."""
    for key in ("boxes", "points", "mask_input"):
        value = prompts.get(key)
        if value is not None:
            return int((value[0] if isinstance(value, tuple) else value).shape[0])
    return 0


def _boxes_as_points(
    boxes: torch.Tensor | None, points: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SAM 2 takes a box as its two corners labelled 2 and 3, ahead of the clicks (as its predictor does)."""
    if boxes is None:
        return points
    corners = boxes.reshape(-1, 2, 2)
    corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).repeat(corners.shape[0], 1)
    if points is None:
        return corners, corner_labels
    return torch.cat([corners, points[0]], dim=1), torch.cat([corner_labels, points[1]], dim=1)
