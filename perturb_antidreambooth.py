#!/usr/bin/env python
r"""MixSyn step 2: Anti-DreamBooth adversarial noise for every image of a clean synthetic dataset.

Le et al. 2023, "Anti-DreamBooth" (arXiv:2303.15433); MixSyn Eq. 2-4. For each group of images (a
domain by default, as the reference protects one identity at a time) a DreamBooth surrogate is trained
and the images are pushed by ℓ∞ PGD to maximise its denoising loss:

- `--method aspl`: for `--max_train_steps` iterations, copy f → f′, train f′ on the clean images, run
  `--max_adv_train_steps` PGD steps against f′, then train f on the perturbed images;
- `--method fsmg`: train one surrogate on the clean images, then run PGD against that fixed model;
- `--method random`: the control: every pixel and channel moved by +η or −η at random (the same ℓ∞, the largest
  ℓ2 the budget allows), no surrogate. MixSyn's claim is that the adversarial direction matters, not the size.

Groups are sharded across `accelerate` processes; every group draws its randomness from a seed derived
from `--seed` and the group index, so 1 and N processes give identical images. Each finished group is
saved at once; a killed run resumes at the next group. Saved images satisfy ‖x_saved − x₀‖∞ ≤ η.

The surrogate is the reference's full UNet (+ text encoder) by default on SD-1.x/2.x (`aspl.py`); `--surrogate
lora` trains LoRA adapters on one frozen base instead (`aspl_lora.py`), the default on SDXL, where a full surrogate
needs about 37 GB even with every memory saving (README: the memory table). On SDXL both text encoders condition
the surrogate and every UNet call gets the square images' time ids (R, R, 0, 0, R, R). SDXL at 1024 px in ≤ 24 GB:
`--mixed_precision bf16 --gradient_checkpointing --pgd_batch_size 1`.

    accelerate launch perturb_antidreambooth.py \
      --pretrained_model_name_or_path outputs/victim/pipeline --dataset_name outputs/synthetic \
      --learning_rate 5e-4 --with_prior_preservation --class_prompt "A photo of a number" \
      --output_dir outputs/perturbed
"""

import argparse
import logging

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.utils import check_min_version

# Shared with the other scripts (mixsyn_utils/):
from mixsyn_utils.adversarial import (  # ASPL / FSMG for one group, the budget-respecting uint8 rounding
    aspl_perturb_group,
    fsmg_perturb_group,
    perturbation_norms,
    quantize_within_budget,
    random_sign_perturbation,
)
from mixsyn_utils.class_images import class_data_dir_of, ensure_class_images  # prior-preservation images, cached
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.dataset_io import (  # datasets in and out (checked before any model loads), with provenance
    check_images_decode,
    check_text_column,
    dataset_provenance,
    load_image_dataset,
    save_dataset,
    with_provenance,
)
from mixsyn_utils.flags import (  # flag groups shared with the other scripts, written out by flag_values
    add_dataset_output_args,
    add_mixed_precision_arg,
    add_pretrained_model_args,
    add_prior_preservation_args,
    add_resolution_arg,
    check_outputs_apart,
    check_paths_or_hub_ids,
    check_prior_preservation_args,
    flag_values,
    require_non_negative,
    require_positive,
    require_range,
)
from mixsyn_utils.images import check_resolution, image_to_tensor  # the shared preprocessing
from mixsyn_utils.lora import UNET_LORA_TARGETS, add_lora_adapters, lora_state  # the LoRA surrogate
from mixsyn_utils.models import (  # SD / SDXL components, the kind checked before loading; captions cut are counted
    SDXL,
    check_pretrained_model,
    load_components,
    native_resolution,
    text_encoders_of,
    tokenize_prompts,
    tokenizers_of,
    warn_truncated_captions,
    weight_dtype_of,
)
from mixsyn_utils.outputs import OutputLock, check_output_dir  # one run per output folder; occupied ones refused
from mixsyn_utils.resumable import (  # groups saved as they finish; a killed run with the same inputs resumes
    ResumableWork,
    input_fingerprint,
    run_signature,
)
from mixsyn_utils.seeds import SALT_SURROGATE_LORA, derive_seed  # group g's generator, independent of process

# Fails with a clear message when the installed diffusers is older than the one these scripts are written for.
check_min_version("0.42.0")

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = ArgumentParser(description="Anti-DreamBooth (ASPL / FSMG) perturbation of a dataset.",
                            allow_abbrev=False)
    add_pretrained_model_args(parser, help="Surrogate's starting point: CompVis/stable-diffusion-v1-4 or outputs/victim/pipeline.")
    parser.add_argument("--dataset_name", type=str, required=True,
                        help="Clean images: a save_to_disk folder, an imagefolder directory or a Hub dataset id.")
    parser.add_argument("--dataset_split", type=str, default="train", help="Split to read from a DatasetDict.")
    parser.add_argument("--image_column", type=str, default="image", help="Column holding the images.")
    parser.add_argument("--caption_column", type=str, default="prompt",
                        help="Column of the captions the surrogate is conditioned on (the images' own prompts).")
    parser.add_argument("--group_by", type=str, default="domain",
                        help="Column defining groups; one surrogate per group, as the reference per identity.")
    parser.add_argument("--method", type=str, default="aspl", choices=["aspl", "fsmg", "random"],
                        help="aspl: alternate surrogate training and PGD (strongest in the paper); "
                             "fsmg: PGD against one fixed surrogate trained on the clean images; random: ±η sign "
                             "noise of the same budget, the control (no surrogate is trained).")
    parser.add_argument("--max_train_steps", type=int, default=50, help="ASPL outer iterations (the reference's 50).")
    parser.add_argument("--max_f_train_steps", type=int, default=3,
                        help="Surrogate DreamBooth steps per ASPL iteration (on clean, then on perturbed images).")
    parser.add_argument("--max_adv_train_steps", type=int, default=6, help="PGD steps per ASPL iteration.")
    parser.add_argument("--fsmg_train_steps", type=int, default=1000,
                        help="FSMG: DreamBooth steps of the fixed surrogate on the clean images (the reference's 1000).")
    parser.add_argument("--fsmg_pgd_steps", type=int, default=100,
                        help="FSMG: PGD steps against the fixed surrogate (the reference's 100).")
    parser.add_argument("--pgd_eps", type=float, default=0.05,
                        help="ℓ∞ budget η in [-1, 1] units (0.05 = 6.4 of 255 levels; the reference's value).")
    parser.add_argument("--pgd_alpha", type=float, default=0.005,
                        help="PGD step size α in [-1, 1] units; must not exceed --pgd_eps.")
    parser.add_argument("--pgd_batch_size", type=int, default=8,
                        help="Images per PGD forward/backward; lower it if a group does not fit in memory.")
    parser.add_argument("--learning_rate", type=float, default=5e-7,
                        help="Surrogate AdamW learning rate. 5e-7 is the reference's for SD-1.x. For the tiny victim "
                             "use 5e-4: measured on its clean images, 3 surrogate steps lower the denoising loss by "
                             "8%% at 5e-4 and by 0.01%% at 5e-7 (30 steps: 34%% vs 0.1%%), i.e. 5e-7 leaves it frozen.")
    parser.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=True,
                        help="Train the surrogate's text encoder(s) too, as the reference's scripts do "
                             "(--no-train_text_encoder: UNet only).")
    parser.add_argument("--surrogate", type=str, default=None, choices=["full", "lora"],
                        help="What the surrogate trains: 'full', every UNet (and text-encoder) weight, deep-copied for "
                             "each copy of f (the reference's aspl.py); 'lora', LoRA adapters on one frozen base in "
                             "--mixed_precision, f and f′ two copies of the adapters (aspl_lora.py). Default: full on "
                             "SD-1.x/2.x, lora on SDXL.")
    parser.add_argument("--lora_rank", type=int, default=4, help="--surrogate lora: rank r (α = r), aspl_lora.py's 4.")
    parser.add_argument("--lora_target_modules", type=str, nargs="+", default=list(UNET_LORA_TARGETS),
                        help="--surrogate lora: the UNet layers that carry LoRA (default: every attention projection, "
                             "as the diffusers LoRA examples); the text encoders' q/k/v/out projections carry it with "
                             "--train_text_encoder.")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Recompute activations in the backward passes of the UNet, the trained text encoders and "
                             "the VAE encoder (PGD's pixel gradient): less memory, about 30%% more compute.")
    add_prior_preservation_args(parser)
    add_resolution_arg(parser)
    parser.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                        help="Center-crop non-square images after resizing (--no-center_crop: top-left). Keep the "
                             "default: `mix_datasets` center-crops the clean images, so the crops line up.")
    add_mixed_precision_arg(parser)
    parser.add_argument("--seed", type=int, default=0, help="Base seed; group g uses a seed derived from it and g.")
    add_dataset_output_args(parser)
    args = parser.parse_args(input_args)

    require_range(args, "pgd_eps", 0, 1, include_low=False)  # pixels span [-1, 1]: η > 1 is no budget at all
    if not 0 < args.pgd_alpha <= args.pgd_eps:
        raise InputError(f"--pgd_alpha must be in (0, --pgd_eps={args.pgd_eps}], got {args.pgd_alpha}")
    require_positive(args, "max_train_steps", "max_adv_train_steps", "fsmg_pgd_steps", "pgd_batch_size", "learning_rate",
                     "lora_rank")
    require_non_negative(args, "max_f_train_steps", "fsmg_train_steps", "seed")
    check_prior_preservation_args(args)
    check_resolution(args.resolution)
    check_outputs_apart(args, ("output_dir",), ("dataset_name", "pretrained_model_name_or_path", "class_data_dir"))
    return args


def plan_groups(dataset, group_by):
    """[(group name, row indices)] in sorted name order; an empty group value is an input error."""
    values = dataset[group_by]
    ids = dataset["id"]
    for image_id, value in zip(ids, values):
        if value is None or str(value).strip() == "":
            raise InputError(f"--group_by {group_by}: row id {image_id!r} has an empty group")
    return [(name, [i for i, value in enumerate(values) if value == name]) for name in sorted(set(values))]


def class_image_tensors(components, args, resolution, accelerator):
    """Pixels and token ids of the cached prior-preservation class images (None, None without prior)."""
    if not args.with_prior_preservation:
        return None, None
    class_images = ensure_class_images(
        args.pretrained_model_name_or_path, args.class_prompt, args.num_class_images,
        class_data_dir_of(args.class_data_dir, args.output_dir),
        revision=args.revision, variant=args.variant, resolution=resolution,
        sample_batch_size=args.sample_batch_size, num_inference_steps=args.class_num_inference_steps,
        seed=args.seed, accelerator=accelerator)
    pixels = torch.stack([image_to_tensor(image, resolution, args.center_crop) for image in class_images["image"]])
    return pixels.to(accelerator.device), token_ids(components, class_images["prompt"])


def token_ids(components, prompts):
    """The prompts' token ids, one (B, L) tensor per text encoder (SDXL: two)."""
    return [tokenize_prompts(tokenizer, prompts) for tokenizer in tokenizers_of(components)]


def perturb_group(components, rows, group_index, class_pixels, class_ids, args, resolution, accelerator,
                  lora_start=None):
    """The group's saved rows: input columns, the budget-respecting perturbed image, `linf` and `l2` of δ."""
    from PIL import Image

    clean_pixels = torch.stack([image_to_tensor(image, resolution, args.center_crop)
                                for image in rows[args.image_column]])
    clean_uint8 = torch.round((clean_pixels + 1.0) * 127.5).to(torch.uint8)  # exact: the tensor came from uint8
    input_ids = token_ids(components, rows[args.caption_column])
    generator = torch.Generator().manual_seed(derive_seed(args.seed, group_index))
    budget = dict(pgd_alpha=args.pgd_alpha, pgd_eps=args.pgd_eps, learning_rate=args.learning_rate,
                  prior_loss_weight=args.prior_loss_weight, train_text_encoder=args.train_text_encoder,
                  pgd_batch_size=args.pgd_batch_size, autocast=accelerator.autocast, lora_start=lora_start)
    if args.method == "random":
        perturbed = random_sign_perturbation(clean_pixels, args.pgd_eps, generator)
    elif args.method == "aspl":
        perturbed = aspl_perturb_group(components, clean_pixels.to(accelerator.device), input_ids, class_pixels,
                                       class_ids, generator, outer_steps=args.max_train_steps,
                                       surrogate_steps=args.max_f_train_steps, pgd_steps=args.max_adv_train_steps,
                                       **budget)
    else:
        perturbed = fsmg_perturb_group(components, clean_pixels.to(accelerator.device), input_ids, class_pixels,
                                       class_ids, generator, surrogate_steps=args.fsmg_train_steps,
                                       pgd_steps=args.fsmg_pgd_steps, **budget)
    perturbed_uint8 = quantize_within_budget(perturbed, clean_uint8, args.pgd_eps)
    linf, l2 = perturbation_norms(perturbed_uint8, clean_uint8)
    saved = {key: value for key, value in rows.items() if key != args.image_column}
    saved[args.image_column] = [Image.fromarray(u.permute(1, 2, 0).numpy()) for u in perturbed_uint8]
    saved.update(linf=linf.tolist(), l2=l2.tolist())
    return saved


def main(args):
    import datasets

    with OutputLock(args.output_dir):  # a second run into this folder is refused
        check_output_dir(args.output_dir, args.overwrite)  # under the lock: the check and the lock are one step
        check_paths_or_hub_ids(args, "dataset_name")  # the model path: by check_pretrained_model, after the data
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        dataset = load_image_dataset(args.dataset_name, args.dataset_split, flag="--dataset_name",
                                     required_columns=("id", args.image_column, args.caption_column, args.group_by))
        check_text_column(dataset, args.caption_column, f"--dataset_name {args.dataset_name}")
        groups = plan_groups(dataset, args.group_by)
        kind = check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # SD3/Flux fail here, in ms
        surrogate = args.surrogate or ("lora" if kind == SDXL else "full")
        check_images_decode(dataset, args.image_column, f"--dataset_name {args.dataset_name}")

        components = load_components(args.pretrained_model_name_or_path, args.revision, args.variant)
        text_encoders = text_encoders_of(components)
        warn_truncated_captions(components.tokenizer, dataset[args.caption_column])
        resolution = args.resolution or native_resolution(components.unet, components.vae)
        weight_dtype = weight_dtype_of(accelerator.mixed_precision)
        for module in (components.vae, components.unet, *text_encoders):
            module.requires_grad_(False)
        # Frozen: gradients only reach the pixels.
        components.vae.to(accelerator.device, dtype=weight_dtype).eval()
        for module in (components.unet, *text_encoders):
            # A full surrogate trains fp32 weights under autocast; a LoRA surrogate's base is frozen in half precision.
            module.to(accelerator.device, dtype=weight_dtype if surrogate == "lora" else None)
        lora_start = None
        if surrogate == "lora":  # the same initial adapters for every group, whichever process runs it
            torch.manual_seed(derive_seed(args.seed, SALT_SURROGATE_LORA))
            models = add_lora_adapters(components.unet, text_encoders if args.train_text_encoder else (),
                                       rank=args.lora_rank, unet_targets=args.lora_target_modules)
            lora_start = lora_state(models)
        if args.gradient_checkpointing:
            components.unet.enable_gradient_checkpointing()
            components.vae.enable_gradient_checkpointing()
            for encoder in text_encoders if args.train_text_encoder else ():
                encoder.gradient_checkpointing_enable()
        class_pixels, class_ids = class_image_tensors(components, args, resolution, accelerator)
        inputs = {"dataset_name": input_fingerprint(args.dataset_name, repo_type="dataset"),
                  "pretrained_model": input_fingerprint(args.pretrained_model_name_or_path, args.revision),
                  "class_images": (input_fingerprint(class_data_dir_of(args.class_data_dir, args.output_dir))
                                   if args.with_prior_preservation else None)}
        work = ResumableWork(args.output_dir, run_signature(flag_values(args), inputs), accelerator,
                             discard_other_settings=args.overwrite)

        def perturb_unit(group_index):
            name, row_indices = groups[group_index]
            saved = perturb_group(components, dataset.select(row_indices)[:], group_index, class_pixels, class_ids,
                                  args, resolution, accelerator, lora_start)
            saved["_row"] = row_indices  # restores the input order when the groups are assembled
            return datasets.Dataset.from_dict(saved)

        logger.info("***** Running Anti-DreamBooth perturbation *****")
        logger.info(f"  Method = {args.method} ({surrogate} surrogate), images = {len(dataset)}, "
                    f"groups ({args.group_by}) = {len(groups)}")
        logger.info(f"  pgd_eps = {args.pgd_eps}, pgd_alpha = {args.pgd_alpha}, resolution = {resolution}")
        perturbed = work.run(len(groups), perturb_unit, desc="Groups")

        if accelerator.is_main_process:
            perturbed = perturbed.sort("_row").remove_columns("_row").cast_column(args.image_column, datasets.Image())
            # The clean set's fingerprint: mixing can tell this set's pairs from those of another set with the same ids.
            provenance = dataset_provenance("perturb_antidreambooth.py", flag_values(args), extra={
                "resolution": resolution, "clean_dataset_fingerprint": inputs["dataset_name"]})
            save_dataset(with_provenance(perturbed, provenance), args.output_dir, args.push_to_hub, args.hub_dataset_id,
                         hub_token=args.hub_token)
            work.cleanup()
            logger.info(f"Saved {len(perturbed)} perturbed images to {args.output_dir} "
                        f"(max ‖δ‖∞ = {max(perturbed['linf']):.4f} ≤ η = {args.pgd_eps})")
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
