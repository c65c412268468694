"""Hugging Face transformers: the CLIP loss of a CLIPModel computed by gammacl, without logits.

``CLIPModel.forward(..., return_loss=True)`` builds logits_per_text = exp(logit_scale) *
t_hat @ i_hat.T (t_hat, i_hat the L2-normalised projected features) and averages the cross-entropy
of its rows and columns. That is gammacl.clip_loss(t_hat, i_hat, exp(logit_scale)), which never
forms the N x N matrix.

    loss = clip_loss_from_inputs(model, input_ids=..., pixel_values=..., attention_mask=...)

or, the Liger way, patch the class once and keep calling the model as before::

    from gammacl.integrations.transformers import apply_gammacl_to_clip
    handle = apply_gammacl_to_clip()          # CLIPModel.forward now computes the loss fused
    out = model(**inputs, return_loss=True)   # out.loss from gammacl; logits skipped in training
    handle.revert()                            # or revert_gammacl_clip()

The patched forward returns the same CLIPOutput. Its logits are still built when they are asked
for; ``skip_logits=None`` (default) skips them (None in the output) when the model is training
and return_loss is set, as Liger-Kernel's fused cross-entropy does; True / False force it. With
``return_dict=False`` (argument or config) it returns transformers' tuple layout: (loss,
logits_per_image, logits_per_text, text_embeds, image_embeds, text output tuple, vision output
tuple), the logits built unless skip_logits=True (then None in their places).

``SiglipModel`` (sigmoid loss) is patched with gammacl.siglip_loss: transformers' loss
-1/N sum_ij log sigmoid(z_ij (exp(logit_scale) <t_i, v_j> + logit_bias)), z = +1 on the diagonal
and -1 elsewhere, is open_clip's SigLipLoss on the normalised features. Any other class is refused
(a CLIP-like class with another loss would silently get the wrong one).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import gammacl
from gammacl.integrations import require

_EXTRA = "transformers"


def _pooled(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4.x) or an output whose pooler_output is
    the projected features (5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _normalise(x: torch.Tensor) -> torch.Tensor:
    # modeling_clip._get_vector_norm: x / sqrt(sum(x^2))
    return x / torch.pow(torch.sum(torch.pow(x, 2), dim=-1, keepdim=True), 0.5)


def _supported() -> dict[type, str]:
    """{transformers class: loss kind} of the classes apply_gammacl_to_clip patches."""
    tf = require("transformers", _EXTRA)
    return {tf.CLIPModel: "clip", tf.SiglipModel: "siglip"}


def _kind(cls: type) -> str:
    for base, kind in _supported().items():
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    name = getattr(cls, "__name__", repr(cls))
    hint = " (SigLIP 2 models take other vision inputs)" if "siglip" in name.lower() else ""
    raise ValueError(
        f"apply_gammacl_to_clip cannot patch {name}{hint}: supported are transformers.CLIPModel "
        "(softmax CLIP loss, gammacl.clip_loss) and transformers.SiglipModel (sigmoid loss, "
        "gammacl.siglip_loss), and their subclasses"
    )


def _as_tuple(out: Any) -> tuple:
    """transformers' tuple layout of a CLIP/SigLIP output, keeping a None in its place."""
    values = (getattr(out, f.name) for f in dataclasses.fields(out))
    return tuple(v.to_tuple() if hasattr(v, "to_tuple") else v for v in values)


def clip_features(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    """(normalised image embeds, normalised text embeds, vision output, text output)."""
    vision = model.get_image_features(
        pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
    )
    text = model.get_text_features(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
    )
    image_embeds = _normalise(_pooled(vision))
    text_embeds = _normalise(_pooled(text)).to(image_embeds.device)
    return image_embeds, text_embeds, vision, text


def clip_loss_from_inputs(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    *,
    backend: str = "auto",
    **kwargs: Any,
) -> torch.Tensor:
    """The loss ``model(..., return_loss=True).loss`` of a CLIPModel (or any model with
    get_image_features, get_text_features and a log-space ``logit_scale`` parameter), computed
    without the logits. Returns a 0-d fp32 tensor (fp64 for an fp64 model)."""
    image_embeds, text_embeds, _, _ = clip_features(
        model,
        input_ids,
        pixel_values,
        attention_mask,
        position_ids,
        interpolate_pos_encoding,
        **kwargs,
    )
    scale = model.logit_scale.exp().to(text_embeds.device)
    return gammacl.clip_loss(text_embeds, image_embeds, scale, backend=backend)


class PatchHandle:
    """Undoes one apply_gammacl_to_clip() call: revert() restores the forwards it patched."""

    def __init__(self, originals: dict) -> None:
        self._originals = originals

    def revert(self) -> None:
        for cls, forward in self._originals.items():
            if _PATCHED.get(cls) is forward:
                cls.forward = forward
                del _PATCHED[cls]
        self._originals = {}


_PATCHED: dict = {}  # class -> original forward


def _make_forward(original, kind: str, skip_logits: bool | None, backend: str):
    if kind == "siglip":
        output_cls = require("transformers.models.siglip.modeling_siglip", _EXTRA).SiglipOutput
    else:
        output_cls = require("transformers.models.clip.modeling_clip", _EXTRA).CLIPOutput

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        return_loss=None,
        interpolate_pos_encoding=False,
        **kwargs,
    ):
        if not return_loss:
            return original(
                self,
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                return_loss=return_loss,
                interpolate_pos_encoding=interpolate_pos_encoding,
                **kwargs,
            )
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        image_embeds, text_embeds, vision, text = clip_features(
            self,
            input_ids,
            pixel_values,
            attention_mask,
            position_ids,
            interpolate_pos_encoding,
            **kwargs,
        )
        scale = self.logit_scale.exp().to(text_embeds.device)
        bias = self.logit_bias.to(text_embeds.device) if kind == "siglip" else 0.0
        if kind == "siglip":
            loss = gammacl.siglip_loss(image_embeds, text_embeds, scale, bias, backend=backend)
        else:
            loss = gammacl.clip_loss(text_embeds, image_embeds, scale, backend=backend)
        skip = skip_logits if skip_logits is not None else (self.training and return_dict)
        logits_per_text = logits_per_image = None
        if not skip:
            logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * scale + bias
            logits_per_image = logits_per_text.t()
        out = output_cls(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=None if isinstance(text, torch.Tensor) else text,
            vision_model_output=None if isinstance(vision, torch.Tensor) else vision,
        )
        return out if return_dict else _as_tuple(out)

    forward._gammacl_original = original
    forward.__doc__ = original.__doc__
    forward.__wrapped__ = original
    return forward


def apply_gammacl_to_clip(
    model_classes: tuple | list | None = None,
    *,
    skip_logits: bool | None = None,
    backend: str = "auto",
) -> PatchHandle:
    """Patches ``forward`` of transformers' CLIPModel (or the given classes: CLIPModel,
    SiglipModel or subclasses; anything else raises ValueError before any class is patched) so
    ``return_loss=True`` computes the loss with gammacl from the normalised features (CLIP:
    clip_loss; SigLIP: siglip_loss). Affects every instance, existing and new. Returns a handle
    whose revert() restores the originals; applying twice is a no-op for classes already
    patched."""
    if model_classes is None:
        model_classes = (require("transformers", _EXTRA).CLIPModel,)
    kinds = {cls: _kind(cls) for cls in model_classes}
    originals = {}
    for cls, kind in kinds.items():
        if cls in _PATCHED:
            continue
        original = cls.forward
        cls.forward = _make_forward(original, kind, skip_logits, backend)
        _PATCHED[cls] = original
        originals[cls] = original
    return PatchHandle(originals)


def revert_gammacl_clip() -> None:
    """Restores every class patched by apply_gammacl_to_clip()."""
    for cls, original in list(_PATCHED.items()):
        cls.forward = original
        del _PATCHED[cls]


def is_patched(cls: type | None = None) -> bool:
    if cls is None:
        cls = require("transformers", _EXTRA).CLIPModel
    return cls in _PATCHED


__all__ = [
    "PatchHandle",
    "apply_gammacl_to_clip",
    "clip_features",
    "clip_loss_from_inputs",
    "is_patched",
    "revert_gammacl_clip",
]
