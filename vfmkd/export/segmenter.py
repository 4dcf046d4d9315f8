"""Promptable segmentation as two ONNX graphs, as EdgeSAM ships it: the image encoder, run
once per image, and the prompt decoder, run per prompt.

:class:`ImageEncoderGraph`: ``images [B, 3, S, S]`` (float RGB in ``[0, 1]``, letterboxed)
-> ``image_embeddings [B, 256, S / 16, S / 16]`` and, for a SAM 2 decoder, ``hires_s8
[B, 64, S / 8, S / 8]`` and ``hires_s4 [B, 32, S / 4, S / 4]``: the student's backbone,
neck and the mask head's own embedding (:class:`~vfmkd.models.heads.sam_mask_head.SAMMaskHead`).

:class:`PromptDecoderGraph` (inputs named as in SAM's ONNX export):

- ``image_embeddings [1, 256, S / 16, S / 16]`` (and ``hires_s8``, ``hires_s4``) of one image;
- ``point_coords [N, K, 2]`` float: K points per prompt, ``(x, y)`` in the *original* image's
  pixels (pixel centres at ``i + 0.5``; the graph letterboxes them itself); a box is its two
  corners labelled 2 and 3;
- ``point_labels [N, K]`` float: 1 positive, 0 negative, 2 / 3 box corners, -1 padding.
  SAM 2 decoders: the graph appends SAM 2's padding point itself. SAM decoders: append a
  ``(0, 0)`` point labelled -1 to a prompt without a box (SAM's convention);
- ``mask_input [N, 1, S / 4, S / 4]`` a previous ``low_res_masks`` (zeros when none) and
  ``has_mask_input [1]`` 1 or 0;
- ``orig_im_size [2]`` float ``(H0, W0)`` of the original image;

-> ``masks [N, 1, H0, W0]`` logits in original pixels (a mask is ``masks > 0``),
``iou_predictions [N, 1]``, ``low_res_masks [N, 1, S / 4, S / 4]`` logits. One mask per
prompt (the best of three by predicted IoU when the head is ``multimask``), exactly as
:meth:`~vfmkd.models.heads.sam_mask_head.SAMMaskHead.predict` gives it: upsampled to the
input, then sampled at each original pixel centre inside the letterbox's valid region
(:func:`~vfmkd.ops.masks.logits_to_original`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageEncoderGraph", "PromptDecoderGraph", "decoder_example_inputs"]

_EMBED_STRIDE = 16
_MAP_INPUT_NAMES = {"embed": "image_embeddings", "hires_s8": "hires_s8", "hires_s4": "hires_s4"}


class ImageEncoderGraph(nn.Module):
    """Backbone, neck and a mask head's image embedding (see the module doc).

    Args:
        model: the deployed student.
        head_name: its ``sam_mask_head``.
    """

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.neck = model.neck
        self.head = model.heads[head_name]
        self.map_names = list(self.head.map_specs)

    @property
    def input_names(self) -> list[str]:
        return ["images"]

    @property
    def output_names(self) -> list[str]:
        return [_MAP_INPUT_NAMES[name] for name in self.map_names]

    def parameter_count(self) -> int:
        """Parameters the graph runs (the head's prompt encoder and decoder belong to the decoder graph)."""
        parts = (self.head.prompt_encoder, self.head.mask_decoder)
        decoder = {id(parameter) for part in parts for parameter in part.parameters()}
        return sum(parameter.numel() for parameter in self.parameters() if id(parameter) not in decoder)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.head(self.neck(self.backbone(images)))
        return tuple(outputs[name] for name in self.map_names)


class PromptDecoderGraph(nn.Module):
    """A mask head's prompt encoder and mask decoder on one image's maps (see the module doc).

    Args:
        head: the deployed ``sam_mask_head``.
        img_size: side of the square network input the maps were computed at.
    """

    def __init__(self, head: nn.Module, img_size: int) -> None:
        super().__init__()
        self.family = head.decoder_type
        self.multimask = bool(head.multimask)
        self.img_size = int(img_size)
        self.map_names = list(head.map_specs)
        self.prompt_encoder = head.prompt_encoder
        self.mask_decoder = head.mask_decoder
        grid = self.img_size // _EMBED_STRIDE
        self.prompt_encoder.image_embedding_size = (grid, grid)
        self.prompt_encoder.input_image_size = (self.img_size, self.img_size)

    @property
    def input_names(self) -> list[str]:
        maps = [_MAP_INPUT_NAMES[name] for name in self.map_names]
        return [*maps, "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]

    @property
    def output_names(self) -> list[str]:
        return ["masks", "iou_predictions", "low_res_masks"]

    def parameter_count(self) -> int:
        """Parameters of the prompt encoder and mask decoder."""
        return sum(parameter.numel() for parameter in self.parameters())

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps = dict(zip(self.map_names, inputs[: len(self.map_names)]))
        point_coords, point_labels, mask_input, has_mask_input, orig_im_size = inputs[len(self.map_names) :]
        letterbox = _letterbox(orig_im_size, self.img_size)
        scale = torch.stack([letterbox["scale_x"], letterbox["scale_y"]])
        offset = torch.stack([letterbox["left"], letterbox["top"]])
        coords = (point_coords.double() * scale + offset).float()
        labels = point_labels.float()
        if self.family == "sam2":
            # NOTE: SAM 2's prompt encoder always appends a padding point when the boxes come as corners.
            coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        sparse = self._embed_points(coords, labels)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask_input * self.prompt_encoder.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask
        low_res, iou = self._decode(maps, sparse, dense)
        upscaled = F.interpolate(low_res, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return _to_original(upscaled, letterbox, orig_im_size, self.img_size), iou, low_res

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sparse prompt embeddings ``[N, K, 256]`` of points in input pixels (vfmkd's convention,
        which is the official coordinates plus the half pixel the prompt encoder adds)."""
        encoder = self.prompt_encoder
        embedding = encoder.pe_layer._pe_encoding(coords / self.img_size)
        labels = labels[..., None]
        embedding = embedding * (labels != -1) + encoder.not_a_point_embed.weight * (labels == -1)
        for index in range(encoder.num_point_embeddings):
            embedding = embedding + encoder.point_embeddings[index].weight * (labels == index)
        return embedding

    def _decode(
        self, maps: dict[str, torch.Tensor], sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits ``[N, 1, S / 4, S / 4]`` and IoUs ``[N, 1]``, the best of three when multimask."""
        options = {
            "image_embeddings": maps["embed"],
            "image_pe": self.prompt_encoder.get_dense_pe(),
            "sparse_prompt_embeddings": sparse,
            "dense_prompt_embeddings": dense,
            "multimask_output": self.multimask,
        }
        if self.family == "sam2":
            high_res = [maps["hires_s4"], maps["hires_s8"]]
            masks, iou = self.mask_decoder(**options, repeat_image=True, high_res_features=high_res)[:2]
        else:
            masks, iou = self.mask_decoder(**options)
        if self.multimask:
            best = iou.argmax(dim=1, keepdim=True)
            iou = iou.gather(1, best)
            masks = masks.gather(1, best[..., None, None].expand(-1, -1, *masks.shape[-2:]))
        return masks, iou


def _letterbox(orig_im_size: torch.Tensor, img_size: int) -> dict[str, torch.Tensor]:
    """The centred letterbox of an ``(H0, W0)`` image into ``img_size`` (float64), as
    :func:`~vfmkd.geometry.letterbox_frame` computes it: scale, content size and offsets."""
    height, width = orig_im_size.double().unbind(0)
    ratio = torch.minimum(img_size / height, img_size / width)
    new_width = torch.round(width * ratio).clamp(1, img_size)
    new_height = torch.round(height * ratio).clamp(1, img_size)
    return {
        "scale_x": new_width / width,
        "scale_y": new_height / height,
        "left": torch.floor((img_size - new_width) / 2),
        "top": torch.floor((img_size - new_height) / 2),
        "width": new_width,
        "height": new_height,
    }


def _to_original(
    logits: torch.Tensor, letterbox: dict[str, torch.Tensor], orig_im_size: torch.Tensor, img_size: int
) -> torch.Tensor:
    """``[N, 1, S, S]`` input-pixel logits sampled at every original pixel centre: ``[N, 1, H0, W0]``.

    Sample points are kept inside the valid region's outer pixel centres, as
    :func:`~vfmkd.ops.masks.logits_to_original` does (padding never leaks in).
    """
    height, width = orig_im_size.long().unbind(0)
    columns = torch.arange(width).double() + 0.5
    rows = torch.arange(height).double() + 0.5
    x = columns * letterbox["scale_x"] + letterbox["left"]
    y = rows * letterbox["scale_y"] + letterbox["top"]
    x = torch.minimum(torch.maximum(x, letterbox["left"] + 0.5), letterbox["left"] + letterbox["width"] - 0.5)
    y = torch.minimum(torch.maximum(y, letterbox["top"] + 0.5), letterbox["top"] + letterbox["height"] - 0.5)
    grid_x = (x * (2.0 / img_size) - 1.0).float()
    grid_y = (y * (2.0 / img_size) - 1.0).float()
    grid = torch.stack(
        [grid_x[None, :].expand(grid_y.shape[0], -1), grid_y[:, None].expand(-1, grid_x.shape[0])], dim=-1
    )
    grid = grid[None].expand(logits.shape[0], -1, -1, -1)
    return F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)


def decoder_example_inputs(encoder_outputs: tuple[torch.Tensor, ...], img_size: int) -> tuple[torch.Tensor, ...]:
    """Inputs to trace and check a decoder: two prompts on a ``3/4 S x S`` image (a box, then two
    points), no mask input."""
    height, width = float(math.ceil(img_size * 3 / 4)), float(img_size)
    coords = torch.tensor([[[0.2, 0.2], [0.7, 0.8]], [[0.5, 0.5], [0.1, 0.9]]]) * torch.tensor([width, height])
    labels = torch.tensor([[2.0, 3.0], [1.0, 0.0]])
    mask_input = torch.zeros(2, 1, img_size // 4, img_size // 4)
    single = tuple(value[:1] for value in encoder_outputs)
    return (*single, coords, labels, mask_input, torch.zeros(1), torch.tensor([height, width]))
