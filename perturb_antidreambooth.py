#!/usr/bin/env python
"""MixSyn step 2: Anti-DreamBooth adversarial noise for every image of a clean synthetic dataset.

Le et al. 2023, "Anti-DreamBooth" (arXiv:2303.15433); MixSyn Eq. 2-4. For each group of images (a
domain by default, as the reference protects one identity at a time) a DreamBooth surrogate is trained
and the images are pushed by ℓ∞ PGD to maximise its denoising loss:

- `--method aspl`: for `--max_train_steps` iterations, copy f → f′, train f′ on the clean images, run
  `--max_adv_train_steps` PGD steps against f′, then train f on the perturbed images;
- `--method fsmg`: train one surrogate on the clean images, then run PGD against that fixed model.

Groups are sharded across `accelerate` processes; every group draws its randomness from a seed derived
from `--seed` and the group index, so 1 and N processes give identical images. Each finished group is
saved at once; a killed run resumes at the next group. Saved images satisfy ‖x_saved − x₀‖∞ ≤ η.

    accelerate launch perturb_antidreambooth.py \
      --pretrained_model_name_or_path outputs/victim/pipeline --dataset_name outputs/synthetic \
      --learning_rate 5e-4 --with_prior_preservation --class_prompt "A photo of a number" \
      --output_dir outputs/perturbed
"""

import argparse
import logging

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from mixsyn_utils.adversarial import aspl_perturb_group, fsmg_perturb_group, perturbation_norms, quantize_within_budget
from mixsyn_utils.data import (
    InputError,
    PartialResults,
    check_output_dir,
    check_resolution,
    dataset_provenance,
    derive_seed,
    image_to_tensor,
    load_image_dataset,
    run_cli,
    save_dataset,
    shard_units,
    with_provenance,
)
from mixsyn_utils.dreambooth import ensure_class_images
from mixsyn_utils.models import add_pretrained_model_args, load_components, native_resolution, tokenize_prompts

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Anti-DreamBooth (ASPL / FSMG) perturbation of a dataset.")
    add_pretrained_model_args(parser, help="Surrogate's starting point: CompVis/stable-diffusion-v1-4 or outputs/victim/pipeline.")
    parser.add_argument("--dataset_name", type=str, required=True,
                        help="Clean images: a save_to_disk folder, an imagefolder directory or a Hub dataset id.")
    parser.add_argument("--dataset_split", type=str, default="train", help="Split to read from a DatasetDict.")
    parser.add_argument("--image_column", type=str, default="image", help="Column holding the images.")
    parser.add_argument("--caption_column", type=str, default="prompt",
                        help="Column of the captions the surrogate is conditioned on (the images' own prompts).")
    parser.add_argument("--group_by", type=str, default="domain",
                        help="Column defining groups; one surrogate per group, as the reference per identity.")
    parser.add_argument("--method", type=str, default="aspl", choices=["aspl", "fsmg"],
                        help="aspl: alternate surrogate training and PGD (strongest in the paper); "
                             "fsmg: PGD against one fixed surrogate trained on the clean images.")
    parser.add_argument("--max_train_steps", type=int, default=50,
                        help="ASPL outer iterations; FSMG runs max_train_steps × max_adv_train_steps PGD steps.")
    parser.add_argument("--max_f_train_steps", type=int, default=3,
                        help="Surrogate DreamBooth steps per ASPL iteration (on clean, then on perturbed images).")
    parser.add_argument("--max_adv_train_steps", type=int, default=6, help="PGD steps per ASPL iteration.")
    parser.add_argument("--fsmg_train_steps", type=int, default=1000,
                        help="FSMG: DreamBooth steps of the fixed surrogate on the clean images.")
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
    parser.add_argument("--train_text_encoder", action="store_true", help="Also train the surrogate's text encoder.")
    parser.add_argument("--with_prior_preservation", action="store_true",
                        help="DreamBooth prior-preservation loss with class images from the base model (Ruiz et al.).")
    parser.add_argument("--class_prompt", type=str, default=None,
                        help="Prompt of the class images, e.g. 'a photo of person'.")
    parser.add_argument("--class_data_dir", type=str, default=None,
                        help="Cache of the class images (a saved dataset); default <output_dir>.class_images.")
    parser.add_argument("--num_class_images", type=int, default=200, help="Class images generated once and cached.")
    parser.add_argument("--prior_loss_weight", type=float, default=1.0, help="λ of the prior-preservation loss.")
    parser.add_argument("--class_num_inference_steps", type=int, default=50, help="Sampler steps for class images.")
    parser.add_argument("--sample_batch_size", type=int, default=4, help="Class images per pipeline call.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Working and output size (multiple of 8); default: the model's native resolution.")
    parser.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=True,
                        help="Center-crop non-square images after resizing (--no-center_crop: top-left). Keep the "
                             "default: `mix_datasets` center-crops the clean images, so the crops line up.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Autocast dtype of the frozen VAE and forward passes; default: the accelerate config.")
    parser.add_argument("--seed", type=int, default=0, help="Base seed; group g uses a seed derived from it and g.")
    parser.add_argument("--output_dir", type=str, required=True, help="Where the perturbed dataset is saved.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output_dir.")
    parser.add_argument("--push_to_hub", action="store_true", help="Also push the dataset to the Hub (private).")
    parser.add_argument("--hub_dataset_id", type=str, default=None, help="Hub dataset repo id for --push_to_hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `huggingface-cli login`).")
    args = parser.parse_args(input_args)

    if args.pgd_eps <= 0:
        raise InputError(f"--pgd_eps must be > 0, got {args.pgd_eps}")
    if not 0 < args.pgd_alpha <= args.pgd_eps:
        raise InputError(f"--pgd_alpha must be in (0, --pgd_eps={args.pgd_eps}], got {args.pgd_alpha}")
    for flag in ("max_train_steps", "max_adv_train_steps", "pgd_batch_size", "sample_batch_size",
                 "class_num_inference_steps"):
        if getattr(args, flag) <= 0:
            raise InputError(f"--{flag} must be positive, got {getattr(args, flag)}")
    for flag in ("max_f_train_steps", "fsmg_train_steps"):
        if getattr(args, flag) < 0:
            raise InputError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.learning_rate <= 0:
        raise InputError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.with_prior_preservation and not args.class_prompt:
        raise InputError("--class_prompt is required with --with_prior_preservation")
    if args.with_prior_preservation and args.num_class_images <= 0:
        raise InputError(f"--num_class_images must be positive, got {args.num_class_images}")
    check_resolution(args.resolution)
    args.class_data_dir = args.class_data_dir or f"{args.output_dir.rstrip('/')}.class_images"
    return args


def plan_groups(dataset, group_by):
    """[(group name, row indices)] in sorted name order; an empty group value is an input error."""
    values = dataset[group_by]
    ids = dataset["id"]
    for image_id, value in zip(ids, values):
        if value is None or str(value).strip() == "":
            raise InputError(f"--group_by {group_by}: row id {image_id!r} has an empty group")
    return [(name, [i for i, value in enumerate(values) if value == name]) for name in sorted(set(values))]


def class_image_tensors(components, args, accelerator):
    """Pixels and token ids of the cached prior-preservation class images (None, None without prior)."""
    if not args.with_prior_preservation:
        return None, None
    class_images = ensure_class_images(
        args.pretrained_model_name_or_path, args.class_prompt, args.num_class_images, args.class_data_dir,
        revision=args.revision, variant=args.variant, resolution=args.resolution,
        sample_batch_size=args.sample_batch_size, num_inference_steps=args.class_num_inference_steps,
        seed=args.seed, accelerator=accelerator)
    pixels = torch.stack([image_to_tensor(image, args.resolution, args.center_crop) for image in class_images["image"]])
    return pixels.to(accelerator.device), tokenize_prompts(components.tokenizer, class_images["prompt"])


def perturb_group(components, rows, group_index, class_pixels, class_ids, args, accelerator):
    """The group's saved rows: input columns, the budget-respecting perturbed image, `linf` and `l2` of δ."""
    from PIL import Image

    clean_pixels = torch.stack([image_to_tensor(image, args.resolution, args.center_crop)
                                for image in rows[args.image_column]])
    clean_uint8 = torch.round((clean_pixels + 1.0) * 127.5).to(torch.uint8)  # exact: the tensor came from uint8
    input_ids = tokenize_prompts(components.tokenizer, rows[args.caption_column])
    generator = torch.Generator().manual_seed(derive_seed(args.seed, group_index))
    perturb = aspl_perturb_group if args.method == "aspl" else fsmg_perturb_group
    perturbed = perturb(components, clean_pixels.to(accelerator.device), input_ids, class_pixels, class_ids, args,
                        generator, autocast=accelerator.autocast)
    perturbed_uint8 = quantize_within_budget(perturbed, clean_uint8, args.pgd_eps)
    linf, l2 = perturbation_norms(perturbed_uint8, clean_uint8)
    saved = {key: value for key, value in rows.items() if key != args.image_column}
    saved[args.image_column] = [Image.fromarray(u.permute(1, 2, 0).numpy()) for u in perturbed_uint8]
    saved.update(linf=linf.tolist(), l2=l2.tolist())
    return saved


def main(args):
    import datasets

    check_output_dir(args.output_dir, args.overwrite)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    dataset = load_image_dataset(args.dataset_name, args.dataset_split,
                                 required_columns=("id", args.image_column, args.caption_column, args.group_by))
    groups = plan_groups(dataset, args.group_by)

    components = load_components(args.pretrained_model_name_or_path, args.revision, args.variant)
    args.resolution = args.resolution or native_resolution(components.unet, components.vae)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (components.vae, components.unet, components.text_encoder):
        module.requires_grad_(False)
    components.vae.to(accelerator.device, dtype=weight_dtype).eval()  # frozen: gradients only reach the pixels
    components.unet.to(accelerator.device)
    components.text_encoder.to(accelerator.device)

    partial = PartialResults(args.output_dir)
    meta_keys = ("pretrained_model_name_or_path", "revision", "variant", "dataset_name", "dataset_split",
                 "image_column", "caption_column", "group_by", "method", "max_train_steps", "max_f_train_steps",
                 "max_adv_train_steps", "fsmg_train_steps", "pgd_eps", "pgd_alpha", "pgd_batch_size", "learning_rate",
                 "train_text_encoder", "with_prior_preservation", "class_prompt", "num_class_images",
                 "prior_loss_weight", "resolution", "center_crop", "mixed_precision", "seed")
    if accelerator.is_main_process:
        partial.write_meta({key: getattr(args, key) for key in meta_keys})
    accelerator.wait_for_everyone()
    class_pixels, class_ids = class_image_tensors(components, args, accelerator)

    my_groups = shard_units(range(len(groups)), accelerator.process_index, accelerator.num_processes)
    todo = [g for g in my_groups if not partial.is_done(g)]
    logger.info("***** Running Anti-DreamBooth perturbation *****")
    logger.info(f"  Method = {args.method}, images = {len(dataset)}, groups ({args.group_by}) = {len(groups)}")
    logger.info(f"  pgd_eps = {args.pgd_eps}, pgd_alpha = {args.pgd_alpha}, resolution = {args.resolution}")
    logger.info(f"  Groups on this process = {len(my_groups)} ({len(my_groups) - len(todo)} already done)")
    progress = tqdm(total=len(my_groups), initial=len(my_groups) - len(todo), desc="Groups",
                    disable=not accelerator.is_local_main_process)
    for group_index in todo:
        name, row_indices = groups[group_index]
        rows = dataset.select(row_indices)[:]
        saved = perturb_group(components, rows, group_index, class_pixels, class_ids, args, accelerator)
        saved["_row"] = row_indices  # restores the input order when the groups are assembled
        partial.save(group_index, datasets.Dataset.from_dict(saved))
        progress.set_postfix(group=name, linf=max(saved["linf"]))
        progress.update(1)
    progress.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        perturbed = partial.load(range(len(groups))).sort("_row").remove_columns("_row")
        perturbed = perturbed.cast_column(args.image_column, datasets.Image())
        with_provenance(perturbed, dataset_provenance("perturb_antidreambooth.py", args))
        save_dataset(perturbed, args.output_dir, args.push_to_hub, args.hub_dataset_id, hub_token=args.hub_token)
        partial.cleanup()
        logger.info(f"Saved {len(perturbed)} perturbed images to {args.output_dir} "
                    f"(max ‖δ‖∞ = {max(perturbed['linf']):.4f} ≤ η = {args.pgd_eps})")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
