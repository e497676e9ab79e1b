"""Anti-DreamBooth adversarial noise (Le et al. 2023, arXiv:2303.15433; MixSyn Eq. 2-4).

The PGD update, the surrogate DreamBooth training, the ASPL and FSMG loops for one group of images, the
random-sign noise of the same budget (the control), and the uint8 rounding that keeps the saved images inside the
ℓ∞ budget. Everything random in a group
draws from one `torch.Generator`, so a group's result does not depend on which process computed it.

The surrogate is either the whole UNet (and text encoders), deep-copied for every copy of f as the reference's
`aspl.py` does, or LoRA adapters on one frozen base (`lora=True`, the reference's `aspl_lora.py`): a copy of f is
then a copy of the adapters' tensors (`lora.lora_state`), which is what lets SDXL's surrogate fit one GPU.
Token ids are one (B, L) tensor per text encoder (SDXL: two); SDXL's time ids are those of the uncropped square
images, (R, R, 0, 0, R, R).
"""

import copy
import itertools
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

from .conditioning import encode_prompts, square_time_ids
from .diffusion import alphas_cumprod, q_sample
from .dreambooth import denoising_loss, dreambooth_loss, prediction_target
from .lora import load_lora_state, lora_parameters, lora_state
from .models import encode_images_to_latents, text_encoders_of

ADAMW_WEIGHT_DECAY = 1e-2  # the reference surrogate's AdamW settings
MAX_GRAD_NORM = 1.0


def pgd_step(perturbed_pixels, grad, original_pixels, pgd_alpha, pgd_eps):
    """One untargeted ℓ∞ PGD ascent step on pixels in [-1, 1] (Madry et al. 2018; Anti-DreamBooth Eq. 4).

    x ← clip_[-1,1]( x₀ + clip_[-η,η]( x + α · sign(∇ₓ L) − x₀ ) )
    with α = `pgd_alpha`, η = `pgd_eps` (both in [-1, 1] units) and x₀ = `original_pixels`.
    """
    stepped = perturbed_pixels + pgd_alpha * grad.sign()
    delta = torch.clamp(stepped - original_pixels, min=-pgd_eps, max=pgd_eps)
    return torch.clamp(original_pixels + delta, min=-1.0, max=1.0).detach()


def random_sign_perturbation(clean_pixels, pgd_eps, generator):
    """The random-noise control of the same budget: x + η · s, s ∈ {−1, +1} per pixel and channel with equal
    probability (drawn from `generator`), clipped to [-1, 1].

    The same ℓ∞ as the adversarial noise and the largest ℓ2 that budget allows, but no direction that the
    diffusion loss prefers: what MixSyn's perturbation must beat to claim more than "noise of this size".
    """
    signs = torch.randint(0, 2, clean_pixels.shape, generator=generator).to(clean_pixels) * 2.0 - 1.0
    return torch.clamp(clean_pixels + pgd_eps * signs, min=-1.0, max=1.0)


def quantize_within_budget(perturbed_pixels, original_uint8, pgd_eps):
    """Pixels in [-1, 1] -> uint8 (B, 3, H, W) whose distance to x₀ stays within η after saving.

    u = round(127.5 · (x + 1)), then u ← clip(u, u₀ − k, u₀ + k) with k = ⌊127.5 · η⌋, so that
    |u − u₀| / 127.5 ≤ η for every pixel: a value rounded past the budget is rounded toward x₀ instead.
    `original_uint8` are the clean images at the same resolution (B, 3, H, W), uint8.
    """
    levels = int(np.floor(127.5 * pgd_eps + 1e-9))
    rounded = torch.round((perturbed_pixels.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).to(torch.int16)
    original = original_uint8.to(torch.int16)
    return torch.minimum(torch.maximum(rounded, original - levels), original + levels).clamp(0, 255).to(torch.uint8)


def perturbation_norms(perturbed_uint8, original_uint8):
    """‖δ‖∞ and ‖δ‖₂ per image of δ = (u − u₀) / 127.5 (in [-1, 1] units), float64 numpy arrays."""
    delta = (perturbed_uint8.double() - original_uint8.double()) / 127.5
    flat = delta.flatten(1)
    return flat.abs().amax(1).numpy(), flat.norm(dim=1).numpy()


def per_encoder(input_ids):
    """Token ids as a list with one (B, L) tensor per text encoder; a bare tensor is SD-1.x/2.x's one encoder's."""
    return [input_ids] if torch.is_tensor(input_ids) else list(input_ids)


def rows_of(input_ids, start, stop):
    """Rows `start:stop` of the token ids of every text encoder."""
    return [ids[start:stop] for ids in per_encoder(input_ids)]


def stacked(*input_ids):
    """Token ids of several row sets, stacked per text encoder."""
    return [torch.cat(ids) for ids in zip(*map(per_encoder, input_ids))]


def surrogate_conditioning(components, input_ids, resolution):
    """c of the token ids (`conditioning.encode_prompts`, one tensor per text encoder), with SDXL's square time ids."""
    device = components.unet.device
    conditioning = encode_prompts(text_encoders_of(components), [ids.to(device) for ids in per_encoder(input_ids)])
    return conditioning.with_time_ids(square_time_ids(resolution, len(conditioning)))


def diffusion_prediction(components, pixel_values, input_ids, generator, autocast=nullcontext, context=None):
    """The surrogate's prediction and target at a random t with random noise (the DreamBooth objective).

    z₀ = E(x) sampled from the VAE posterior, t ~ U{0..T−1}, ε ~ N(0, I), z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε;
    returns (ŷ = UNet(z_t, t, c), y = ε or v, t). Gradients reach `pixel_values` through the frozen encoder.
    `context`: precomputed c (`surrogate_conditioning`), when it cannot change between calls.
    """
    device = components.unet.device
    with autocast():
        latents = encode_images_to_latents(components.vae, pixel_values.to(device), sample=True, generator=generator)
        latents = latents.float()
        noise = torch.randn(latents.shape, generator=generator).to(device)
        num_timesteps = components.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator).to(device)
        noisy_latents = q_sample(latents, noise, timesteps, alphas_cumprod(components.noise_scheduler))
        if context is None:
            context = surrogate_conditioning(components, input_ids, pixel_values.shape[-1])
        model_pred = components.unet(noisy_latents, timesteps, **context.unet_kwargs()).sample
    return model_pred, prediction_target(components.noise_scheduler, latents, noise, timesteps), timesteps


def surrogate_models(components, train_text_encoder):
    """The models whose weights the surrogate trains: the UNet, and the text encoder(s) with `train_text_encoder`."""
    return [components.unet, *(text_encoders_of(components) if train_text_encoder else ())]


def train_surrogate(components, instance_pixels, instance_ids, class_pixels, class_ids, num_steps, learning_rate,
                    generator, prior_loss_weight=1.0, train_text_encoder=True, autocast=nullcontext, first_step=0,
                    lora=False):
    """The surrogate (UNet, and text encoder(s) when trained) after `num_steps` DreamBooth steps.

    Full surrogate: a deep copy is trained and returned, `components` untouched. With `lora`: the LoRA adapters
    `components` carry are trained in place and `components` is returned (a caller keeps copies with
    `lora.lora_state`). As the reference: a fresh AdamW (weight decay 1e-2), one instance image plus one class image
    per step when class images are given, loss L_instance + λ L_prior, gradient norm clipped to 1. Step j trains on
    instance image (first_step + j) mod n: the reference always starts at image 0, which with more images than steps
    per call (100 vs 3) would train on images 0–2 only; a caller that advances `first_step` sees every image in turn.
    """
    if lora:
        trained = components
        parameters = list(lora_parameters(surrogate_models(components, train_text_encoder)).values())
    else:
        copies = {"unet": copy.deepcopy(components.unet)}
        if train_text_encoder:
            copies.update({name: copy.deepcopy(getattr(components, name)) for name in ("text_encoder", "text_encoder_2")
                           if getattr(components, name, None) is not None})
        trained = SimpleNamespace(**dict(vars(components), **copies))
        parameters = list(itertools.chain(*(model.parameters() for model in copies.values())))
    for model in surrogate_models(trained, train_text_encoder):
        model.train()
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=ADAMW_WEIGHT_DECAY)
    for step in range(first_step, first_step + num_steps):
        index = step % len(instance_pixels)
        pixel_values, input_ids = instance_pixels[index:index + 1], rows_of(instance_ids, index, index + 1)
        if class_pixels is not None:
            class_index = step % len(class_pixels)
            pixel_values = torch.cat([pixel_values, class_pixels[class_index:class_index + 1]])
            input_ids = stacked(input_ids, rows_of(class_ids, class_index, class_index + 1))
        model_pred, target, timesteps = diffusion_prediction(trained, pixel_values, input_ids, generator, autocast)
        loss, _, _ = dreambooth_loss(model_pred, target, timesteps, components.noise_scheduler, num_instance=1,
                                     prior_loss_weight=prior_loss_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for parameter in parameters:
        parameter.requires_grad_(False)
    for model in surrogate_models(trained, train_text_encoder):
        model.eval()
    return trained


def pgd_attack(components, perturbed_pixels, original_pixels, input_ids, num_steps, pgd_alpha, pgd_eps, generator,
               batch_size=8, autocast=nullcontext):
    """`num_steps` PGD steps (`pgd_step`) maximising the surrogate's diffusion MSE, in chunks of `batch_size`.

    Only the pixels get gradients (`torch.autograd.grad`), so the frozen surrogate accumulates none. The
    text context does not depend on the pixels, so it is encoded once, not at every step.
    """
    perturbed_pixels = perturbed_pixels.detach().clone()
    starts = range(0, len(perturbed_pixels), batch_size)
    with torch.no_grad(), autocast():
        contexts = [surrogate_conditioning(components, rows_of(input_ids, start, start + batch_size),
                                           perturbed_pixels.shape[-1]) for start in starts]
    for _ in range(num_steps):
        for start, context in zip(starts, contexts):
            chunk = perturbed_pixels[start:start + batch_size].clone().requires_grad_(True)
            model_pred, target, timesteps = diffusion_prediction(
                components, chunk, rows_of(input_ids, start, start + batch_size), generator, autocast, context=context)
            loss = denoising_loss(model_pred, target, timesteps, components.noise_scheduler)
            (grad,) = torch.autograd.grad(loss, chunk)
            perturbed_pixels[start:start + batch_size] = pgd_step(
                chunk.detach(), grad.to(chunk.device), original_pixels[start:start + batch_size], pgd_alpha, pgd_eps)
    return perturbed_pixels


def aspl_perturb_group(components, clean_pixels, input_ids, class_pixels, class_ids, generator, *, outer_steps,
                       surrogate_steps, pgd_steps, pgd_alpha, pgd_eps, learning_rate, prior_loss_weight=1.0,
                       train_text_encoder=True, pgd_batch_size=8, autocast=nullcontext, lora_start=None):
    """ASPL (Anti-DreamBooth Alg. 1): for each of `outer_steps` iterations i, f′ ← copy(f) trained on the clean
    images for `surrogate_steps`, δ ← `pgd_steps` PGD steps against f′ on every image, then f trained on the
    perturbed images. Both trainings of iteration i use images i·F … i·F + F − 1 (mod n), F = `surrogate_steps`, so
    every image is trained on in turn. With `lora_start` (a `lora.lora_state` of the adapters `components` carry)
    f and f′ are LoRA weights on the frozen base, f starting at `lora_start`. Returns the perturbed pixels in [-1, 1].
    """
    train = dict(learning_rate=learning_rate, generator=generator, prior_loss_weight=prior_loss_weight,
                 train_text_encoder=train_text_encoder, autocast=autocast, lora=lora_start is not None)
    models = surrogate_models(components, train_text_encoder)
    f_state = lora_start
    perturbed_pixels = clean_pixels.clone()
    for iteration in range(outer_steps):
        first_step = iteration * surrogate_steps
        if f_state is not None:
            load_lora_state(models, f_state)  # f′ starts as a copy of f
        surrogate = train_surrogate(components, clean_pixels, input_ids, class_pixels, class_ids, surrogate_steps,
                                    first_step=first_step, **train)
        perturbed_pixels = pgd_attack(surrogate, perturbed_pixels, clean_pixels, input_ids, pgd_steps, pgd_alpha,
                                      pgd_eps, generator, pgd_batch_size, autocast)
        del surrogate
        if f_state is not None:
            load_lora_state(models, f_state)  # back to f
        components = train_surrogate(components, perturbed_pixels, input_ids, class_pixels, class_ids,
                                     surrogate_steps, first_step=first_step, **train)
        if f_state is not None:
            f_state = lora_state(models)
    return perturbed_pixels


def fsmg_perturb_group(components, clean_pixels, input_ids, class_pixels, class_ids, generator, *, surrogate_steps,
                       pgd_steps, pgd_alpha, pgd_eps, learning_rate, prior_loss_weight=1.0, train_text_encoder=True,
                       pgd_batch_size=8, autocast=nullcontext, lora_start=None):
    """FSMG (Anti-DreamBooth Sec. 4.2): one DreamBooth surrogate trained on the clean images for
    `surrogate_steps`, then `pgd_steps` PGD steps against that fixed model (the reference's scripts: 1000
    and 100); with `lora_start`, LoRA adapters starting there (see `aspl_perturb_group`). Returns the perturbed
    pixels in [-1, 1].
    """
    if lora_start is not None:
        load_lora_state(surrogate_models(components, train_text_encoder), lora_start)
    surrogate = train_surrogate(components, clean_pixels, input_ids, class_pixels, class_ids, surrogate_steps,
                                learning_rate=learning_rate, generator=generator, prior_loss_weight=prior_loss_weight,
                                train_text_encoder=train_text_encoder, autocast=autocast, lora=lora_start is not None)
    return pgd_attack(surrogate, clean_pixels, clean_pixels, input_ids, pgd_steps, pgd_alpha, pgd_eps, generator,
                      pgd_batch_size, autocast)
