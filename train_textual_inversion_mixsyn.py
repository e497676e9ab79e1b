#!/usr/bin/env python
"""MixSyn fine-tuning with Textual Inversion: one learned placeholder token per private domain.

The flags are those of diffusers' `examples/textual_inversion/textual_inversion.py` plus the MixSyn data
flags. Each domain d gets the placeholder `--placeholder_token_template` (default "<{domain}>"), spread
over `--num_vectors` tokens the upstream way (<d>, <d>_1, …), initialised from the mean embedding of the
domain name's tokens. Captions are the dataset's own with the domain name replaced by its placeholder
(`mixsyn_utils.models.rewrite_caption`, the same rewrite the attack scripts use). Only the new rows of the
token-embedding matrix train (Gal et al. 2022, arXiv:2208.01618).

Upstream's single-concept input works too: `--instance_data_dir DIR --instance_prompt "The face of Ada
Lovelace" --instance_domain "Ada Lovelace"` learns `<Ada Lovelace>` from the folder's images.

Output: `learned_embeds-<domain>.safetensors` per domain (each loadable by `pipe.load_textual_inversion`),
`learned_embeds.safetensors` for a single-domain run, and `token_map.json` (domain → placeholder, file).

    accelerate launch train_textual_inversion_mixsyn.py \
      --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
      --dataset_name outputs/synthetic --perturbed_dataset_name outputs/perturbed \
      --mixup_mode image --mixup_ratio 0.5 --max_train_steps 3000 --output_dir outputs/ti
"""

import argparse
import json
from functools import partial
from pathlib import Path

import torch
from accelerate.logging import get_logger

# Shared with the other training scripts (mixsyn_utils/):
from mixsyn_utils.cli import InputError, run_cli  # one-line errors for bad input
from mixsyn_utils.dataset_io import check_text_column, row_names  # a None domain is an error naming its row
from mixsyn_utils.flags import add_training_args, check_training_args  # flag groups shared with the other scripts
from mixsyn_utils.model_card import finish_outputs  # model card (with measured privacy) and Hub upload
from mixsyn_utils.models import (  # SD components, checked before the data is read
    check_pretrained_model,
    load_components,
    native_resolution,
    weight_dtype_of,
)
from mixsyn_utils.outputs import move_entries_into, temp_sibling  # files staged, then moved in whole
from mixsyn_utils.placeholders import (  # the token map and the caption rewrite the attacks use too
    TOKEN_MAP_FILE,
    domain_name_pattern,
    rewrite_caption,
)
from mixsyn_utils.training import (  # accelerator, optimizer, checkpoints, the loop, validation, the batch loss
    LatentEncoder,
    denoising_batch_loss,
    init_trackers,
    log_validation,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    plan_steps,
    register_pretrained_checkpoint_hooks,
    resolve_resume_checkpoint,
    resume_training_state,
    scaled_learning_rate,
    start_output_dir,
    train_loop,
    training_inputs,
    training_signature,
    validation_pipeline,
)
from mixsyn_utils.training_data import TrainingImages, load_training_images, make_dataloader  # the training set

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="MixSyn Textual Inversion: one learned token per domain.")
    add_training_args(parser)
    group = parser.add_argument_group("textual inversion")
    group.add_argument("--placeholder_token_template", type=str, default="<{domain}>",
                       help="Placeholder of each domain; '{domain}' is replaced by the domain name.")
    group.add_argument("--num_vectors", type=int, default=1, help="Embedding vectors per placeholder.")
    group.add_argument("--domain_column", type=str, default="domain",
                       help="Column of --dataset_name naming each image's domain (its name appears in the caption).")
    parser.set_defaults(learning_rate=1e-4, train_batch_size=16, max_train_steps=5000,
                        output_dir="text-inversion-model")
    args = parser.parse_args(input_args)
    if "{domain}" not in args.placeholder_token_template:
        raise InputError(f"--placeholder_token_template must contain '{{domain}}', got {args.placeholder_token_template!r}")
    if args.num_vectors <= 0:
        raise InputError(f"--num_vectors must be positive, got {args.num_vectors}")
    check_training_args(args)
    if args.instance_data_dir is not None:
        if not args.instance_domain:
            raise InputError("--instance_domain is required with --instance_data_dir: the word(s) of --instance_prompt "
                             "that the learned token replaces, e.g. --instance_prompt 'The face of Ada Lovelace' "
                             "--instance_domain 'Ada Lovelace'")
        domains_named_in_captions([args.instance_domain], [args.instance_prompt])
    return args


def domains_named_in_captions(domains, captions):
    """The domains in order of appearance; an error if a domain's name is in none of its captions.

    A placeholder replaces the domain name in the captions; a domain whose name never appears would
    train nothing, so the run stops before any model is loaded.
    """
    named = {}
    for domain, caption in zip(domains, captions):
        named[domain] = named.get(domain, False) or domain_name_pattern(domain).search(caption) is not None
    silent = [domain for domain, found in named.items() if not found]
    if silent:
        raise InputError(f"no caption of domain {silent[0]!r} contains its name, so its token would never train "
                         "(with --instance_data_dir: --instance_domain must appear in --instance_prompt)")
    return list(named)


def add_placeholder_tokens(args, domains, tokenizer, text_encoder):
    """Add `<d>`, `<d>_1`, … per domain; initialise each from the mean embedding of the domain name's tokens.

    Returns {domain: {"placeholder", "file", "num_vectors", "token_ids"}}. A placeholder that is already
    in the vocabulary is an error (its old meaning would leak into training).
    """
    token_map = {}
    for domain in domains:
        placeholder = args.placeholder_token_template.format(domain=domain)
        tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, args.num_vectors)]
        # A placeholder the tokenizer already reads as one known token (e.g. "zero" → "zero</w>") would
        # shadow that word, and its old meaning would leak into training.
        pieces = tokenizer.tokenize(placeholder)
        known_word = len(pieces) == 1 and pieces[0] in tokenizer.get_vocab()
        if known_word or tokenizer.add_tokens(tokens) != len(tokens):
            raise InputError(f"--placeholder_token_template gives {placeholder!r} for domain {domain!r}, which is "
                             "already in the tokenizer's vocabulary; pick another template")
        token_map[domain] = {"placeholder": placeholder, "file": f"learned_embeds-{domain}.safetensors",
                             "num_vectors": args.num_vectors, "token_ids": tokenizer.convert_tokens_to_ids(tokens)}
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set just below
    embeddings = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for domain, entry in token_map.items():
            name_ids = tokenizer.encode(domain, add_special_tokens=False)
            embeddings[entry["token_ids"]] = embeddings[name_ids].mean(dim=0)
    return token_map


def check_placeholders_within_limit(tokenizer, captions, token_map, names):
    """Every placeholder token must lie before the tokenizer's cut: ids past `model_max_length` − 1 (the last
    kept position holds the end token) are dropped, and a placeholder there would train nothing.

    `names[i]` labels caption i in the error (its row id).
    """
    placeholder_ids = {token_id for entry in token_map.values() for token_id in entry["token_ids"]}
    limit = tokenizer.model_max_length - 1
    checked = set()
    for caption, name in zip(captions, names):
        if caption in checked:
            continue
        token_ids = tokenizer(caption, truncation=False, verbose=False).input_ids
        cut = [position for position, token_id in enumerate(token_ids)
               if token_id in placeholder_ids and position >= limit]
        if cut:
            raise InputError(f"{name}: its placeholder lands at token {cut[0]}, past the tokenizer's "
                             f"{tokenizer.model_max_length}-token limit, so it would never train; shorten the caption")
        checked.add(caption)


def keep_original_embeddings(text_encoder, original_embeddings, trained_ids):
    """After each update: restore every row but the placeholders' (AdamW's decay would move them)."""
    frozen = torch.ones(len(original_embeddings), dtype=torch.bool, device=original_embeddings.device)
    frozen[trained_ids] = False

    def restore():
        with torch.no_grad():
            weight = text_encoder.get_input_embeddings().weight
            weight[frozen] = original_embeddings[frozen]
    return restore


def save_learned_embeds(output_dir, text_encoder, token_map):
    """One safetensors file per domain ({placeholder: (num_vectors, D)}), the token map, and upstream's file."""
    from safetensors.torch import save_file

    weight = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    staging_dir = temp_sibling(Path(output_dir) / "learned_embeds")
    public_map = {domain: {k: v for k, v in entry.items() if k != "token_ids"} for domain, entry in token_map.items()}
    for entry in token_map.values():
        save_file({entry["placeholder"]: weight[entry["token_ids"]].contiguous()}, str(staging_dir / entry["file"]))
    if len(token_map) == 1:
        entry = next(iter(token_map.values()))
        save_file({entry["placeholder"]: weight[entry["token_ids"]].contiguous()},
                  str(staging_dir / "learned_embeds.safetensors"))
    (staging_dir / TOKEN_MAP_FILE).write_text(json.dumps(public_map, indent=2, sort_keys=True))
    move_entries_into(staging_dir, output_dir)


def main(args):
    check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # before the data: fails in ms
    accelerator = make_accelerator(args)
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    training_set = load_training_images(args, accelerator.is_main_process)
    images, caption_column = training_set.rows, training_set.caption_column
    domain_column = "domain" if args.instance_data_dir is not None else args.domain_column
    if domain_column not in images.column_names:
        raise InputError(f"--dataset_name {args.dataset_name} has no column {domain_column!r} (needed to know "
                         "which placeholder each image trains)")
    check_text_column(images, domain_column, "training set")
    components = load_components(args.pretrained_model_name_or_path, args.revision, args.variant)
    unet, text_encoder, vae, tokenizer = components.unet, components.text_encoder, components.vae, components.tokenizer
    resolution = args.resolution or native_resolution(unet, vae)
    domains = domains_named_in_captions(images[domain_column], images[caption_column])
    token_map = add_placeholder_tokens(args, domains, tokenizer, text_encoder)
    trained_ids = [i for entry in token_map.values() for i in entry["token_ids"]]

    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.get_input_embeddings().requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()

    captions = [rewrite_caption(caption, domain, token_map)
                for caption, domain in zip(images[caption_column], images[domain_column])]
    check_placeholders_within_limit(tokenizer, captions, token_map, row_names(images, "training set"))
    dataset = TrainingImages(images, tokenizer, resolution, captions, args.center_crop, args.random_flip,
                             args.seed or 0)
    dataloader, batch_sampler = make_dataloader(dataset, args, accelerator)
    plan = plan_steps(args, batch_sampler.batches_per_epoch())
    params = list(text_encoder.get_input_embeddings().parameters())
    learning_rate = scaled_learning_rate(args, accelerator.num_processes)
    optimizer = make_optimizer(params, learning_rate, args)
    lr_scheduler = make_lr_scheduler(optimizer, args, plan, accelerator.num_processes)
    text_encoder, optimizer, lr_scheduler = accelerator.prepare(text_encoder, optimizer, lr_scheduler)
    register_pretrained_checkpoint_hooks(accelerator)
    start_output_dir(accelerator, args)  # --overwrite empties it here, once every input was checked
    init_trackers(accelerator, args, "mixsyn-textual-inversion")
    signature = training_signature(args, training_inputs(args, training_set))
    global_step = resume_training_state(accelerator, resume_path, signature)
    original_embeddings = accelerator.unwrap_model(text_encoder).get_input_embeddings().weight.detach().clone()

    def validate(step):
        pipeline = validation_pipeline(args, accelerator, text_encoder=text_encoder, tokenizer=tokenizer)
        log_validation(accelerator, args, pipeline, step, resolution)

    loss_fn = partial(denoising_batch_loss, unet=unet, latent_encoder=LatentEncoder(vae), text_encoder=text_encoder,
                      noise_scheduler=components.noise_scheduler, weight_dtype=weight_dtype, snr_gamma=args.snr_gamma)
    train_loop(accelerator, args, plan, models=[text_encoder], dataloader=dataloader, batch_sampler=batch_sampler,
               optimizer=optimizer, lr_scheduler=lr_scheduler, params_to_clip=params, loss_fn=loss_fn,
               signature=signature, global_step=global_step, validate=validate, logger=logger,
               after_update=keep_original_embeddings(accelerator.unwrap_model(text_encoder), original_embeddings,
                                                     trained_ids))

    if accelerator.is_main_process:
        save_learned_embeds(args.output_dir, accelerator.unwrap_model(text_encoder), token_map)
    finish_outputs(accelerator, args, f"Textual Inversion ({args.num_vectors} vector(s) per domain)",
                   training_set.mix_info,
                   {"steps": plan.max_train_steps, "learning_rate": learning_rate, "resolution": resolution})


if __name__ == "__main__":
    run_cli(main, parse_args)
