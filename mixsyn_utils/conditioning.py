"""What the UNet is conditioned on besides z_t and t, for SD-1.x/2.x and SDXL: one dataclass, one encoder.

SD-1.x/2.x: c = the text encoder's last hidden state (after its final LayerNorm), (B, L, D).
SDXL (Podell et al. 2023, arXiv:2307.01952, Sec. 2.2 and 2.3), as diffusers' `StableDiffusionXLPipeline`:
- c = concat_last(h¹₋₂, h²₋₂): the PENULTIMATE hidden states of both CLIP encoders (no final LayerNorm),
  (B, L, D₁ + D₂), encoder 1 first;
- p = the pooled embedding of encoder 2 (`CLIPTextModelWithProjection.text_embeds`: its projection of the final
  LayerNorm at the first end-of-text token), (B, P);
- the micro-conditioning time ids [orig_h, orig_w, crop_top, crop_left, target_h, target_w], (B, 6): the image's
  size before resizing, the top-left corner of the training crop, the size the model renders. The UNet embeds each
  id with sinusoids and adds them, with p, to the timestep embedding (`added_cond_kwargs`).
"""

from dataclasses import dataclass, replace

import torch

from .models import tokenize_prompts


@dataclass(frozen=True)
class TextConditioning:
    """The UNet's conditioning of a batch: `hidden_states` c (B, L, D); for SDXL also `pooled` p (B, P) and
    `time_ids` (B, 6). Every field is indexed by the batch row."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor = None
    time_ids: torch.Tensor = None

    def __len__(self):
        return len(self.hidden_states)

    def _fields(self):
        return {"hidden_states": self.hidden_states, "pooled": self.pooled, "time_ids": self.time_ids}

    def _apply(self, fn):
        return TextConditioning(**{name: None if value is None else fn(value) for name, value in self._fields().items()})

    def unet_kwargs(self):
        """Keyword arguments of `UNet2DConditionModel.forward`: `encoder_hidden_states`, and for SDXL
        `added_cond_kwargs = {"text_embeds": p, "time_ids": ids}`."""
        kwargs = {"encoder_hidden_states": self.hidden_states}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def select(self, index):
        """The rows `index` (an int keeps the batch dimension, as a slice does)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return self._apply(lambda value: value[index])

    def to(self, device=None, dtype=None):
        """On `device`, floating fields in `dtype` (the time ids too: the UNet embeds them in its own dtype)."""
        return self._apply(lambda value: value.to(device=device, dtype=dtype))

    def expand(self, batch_size):
        """A one-row conditioning repeated to `batch_size` rows (views, no copy)."""
        return self._apply(lambda value: value.expand(batch_size, *value.shape[1:]))

    def with_time_ids(self, time_ids):
        """The same text with SDXL's time ids (B, 6) attached; unchanged for SD-1.x/2.x (no pooled embedding)."""
        if self.pooled is None:
            return self
        return replace(self, time_ids=time_ids.to(device=self.pooled.device, dtype=self.pooled.dtype))

    @staticmethod
    def cat(conditionings):
        """Rows of several conditionings stacked in order (classifier-free guidance: [c_∅; c])."""
        first = conditionings[0]
        return TextConditioning(**{name: None if value is None else torch.cat([c._fields()[name] for c in conditionings])
                                   for name, value in first._fields().items()})


def as_conditioning(context):
    """A `TextConditioning` as is; a bare (B, L, D) tensor as SD-1.x's conditioning."""
    return context if isinstance(context, TextConditioning) else TextConditioning(context)


def unwrapped(encoder):
    """The text encoder itself: a trained encoder in multi-process training is wrapped in DistributedDataParallel,
    which forwards calls but has no `config` or `device` of its own."""
    return getattr(encoder, "module", encoder)


def encode_prompts(text_encoders, input_ids, attention_masks=None):
    """The text conditioning of token ids: the one encoder of SD-1.x/2.x and SDXL (no time ids: see
    `size_time_ids`).

    `text_encoders`: (text_encoder,) for SD-1.x/2.x or (text_encoder, text_encoder_2) for SDXL; `input_ids` one
    (B, L) tensor per encoder (each tokenizer's own ids); `attention_masks` None or one per encoder.
    One encoder: c = last hidden state. Two: c = concat(h¹₋₂, h²₋₂), p = encoder 2's `text_embeds` (module doc).
    Gradients flow when the caller enables them (LoRA or textual inversion on the encoders).
    """
    masks = attention_masks or [None] * len(text_encoders)
    if len(text_encoders) == 1:
        (encoder,), (ids,), (mask,) = text_encoders, input_ids, masks
        config, device = unwrapped(encoder).config, unwrapped(encoder).device
        if mask is None and getattr(config, "use_attention_mask", False):
            mask = (ids != config.pad_token_id).long()
        return TextConditioning(encoder(ids.to(device), attention_mask=None if mask is None else mask.to(device))[0])
    penultimate, pooled = [], None
    for encoder, ids, mask in zip(text_encoders, input_ids, masks):
        device = unwrapped(encoder).device
        output = encoder(ids.to(device), attention_mask=None if mask is None else mask.to(device),
                         output_hidden_states=True)
        penultimate.append(output.hidden_states[-2])
        pooled = output[0]  # encoder 2's text_embeds (B, P); encoder 1's [0] (3-D) is overwritten
    return TextConditioning(torch.cat(penultimate, dim=-1), pooled)


def size_time_ids(original_sizes, crops_top_left, target_size):
    """SDXL's micro-conditioning (B, 6) float32: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] per row.

    `original_sizes` and `crops_top_left`: (B, 2) (height, width) and (top, left) per image; `target_size`:
    (height, width), the size the model is trained to render (the training resolution).
    """
    original = torch.as_tensor(original_sizes, dtype=torch.float32).view(-1, 2)
    crops = torch.as_tensor(crops_top_left, dtype=torch.float32).view(-1, 2)
    target = torch.as_tensor(target_size, dtype=torch.float32).view(1, 2).expand(len(original), 2)
    return torch.cat([original, crops, target], dim=1)


def square_time_ids(resolution, batch_size):
    """(R, R, 0, 0, R, R) for every row: an uncropped square image of R px rendered at R px.

    What `StableDiffusionXLPipeline` feeds by default at R × R, and what an attacker must assume: the size and
    crop a training image was given are not in the image.
    """
    return size_time_ids([[resolution, resolution]] * batch_size, [[0, 0]] * batch_size, (resolution, resolution))


def empty_prompt_conditioning(text_encoders, tokenizers, force_zeros_for_empty_prompt=False):
    """The unconditional c_∅ (one row) that classifier-free guidance subtracts, as the model's pipeline makes it.

    The encoded empty prompt, or zeros for c and p when the pipeline has `force_zeros_for_empty_prompt` (SDXL
    base: the model was trained with dropped captions zeroed, and its pipeline guides against zeros).
    """
    with torch.no_grad():
        encoded = encode_prompts(text_encoders, [tokenize_prompts(tokenizer, [""]) for tokenizer in tokenizers])
    if force_zeros_for_empty_prompt:
        return encoded._apply(torch.zeros_like)
    return encoded

