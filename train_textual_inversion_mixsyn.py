#!/usr/bin/env python
r"""MixSyn fine-tuning with Textual Inversion: one learned placeholder token per private domain.

The flags are those of diffusers' `examples/textual_inversion/textual_inversion.py` plus the MixSyn data
flags. Each domain d gets the placeholder `--placeholder_token_template` (default "<{domain}>") filled with the
domain name's lower-case slug ("Ada Lovelace" → `<ada-lovelace>`, which the CLIP tokenizer reads back unchanged),
spread over `--num_vectors` tokens the upstream way (<d>, <d>_1, …), initialised from the mean embedding of the
domain name's tokens (or from `--initializer_token`). Captions are the dataset's own with the domain name replaced
by its placeholder (`mixsyn_utils.placeholders.rewrite_caption`, the same rewrite the attack scripts use). Only
the new rows of the token-embedding matrix train (Gal et al. 2022, arXiv:2208.01618).

Upstream's single-concept inputs work too: `--train_data_dir DIR --placeholder_token "<cat-toy>"
--initializer_token toy` captions a folder of bare images with the paper's templates (`--learnable_property`), and
`--instance_data_dir DIR --instance_prompt "The face of Ada Lovelace" --instance_domain "Ada Lovelace"` learns
`<ada-lovelace>` from the folder's images.

Output: `learned_embeds.safetensors` for one concept (`pipe.load_textual_inversion(output_dir)` loads it), one
`learned_embeds-<slug>.safetensors` per domain for several (load each with `weight_name=`), and `token_map.json`
(domain → placeholder, file, vectors).

On an SDXL base (read from its model_index.json; upstream's `textual_inversion_sdxl.py`) each placeholder is added
to both tokenizers and both text encoders, both embedding rows train, and each concept has a second file
`learned_embeds_2[-<slug>].safetensors` (`file_2` in the token map) for `text_encoder_2`:
`pipe.load_textual_inversion(output_dir, weight_name="learned_embeds_2.safetensors", token=..., text_encoder=
pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)`. The UNet sees each image's size and crop as its time ids.

    accelerate launch train_textual_inversion_mixsyn.py \
      --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
      --dataset_name outputs/synthetic --perturbed_dataset_name outputs/perturbed \
      --mixup_mode image --mixup_ratio 0.5 --max_train_steps 3000 --output_dir outputs/ti
"""

import json
import logging
import math
from pathlib import Path

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.utils import check_min_version
from tqdm.auto import tqdm

# Shared with the other training scripts (mixsyn_utils/):
from mixsyn_utils.checkpoints import (  # where to resume, what it must match, checkpoints saved whole
    check_resume,
    load_resume_state,
    register_pretrained_checkpoint_hooks,
    removed_if_nothing_finished,
    resolve_resume_checkpoint,
    save_checkpoint,
    training_signature,
)
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.dataset_io import check_text_column, row_names, save_dataset  # None domains named; the mixed set
from mixsyn_utils.flags import check_paths_or_hub_ids, flag_values  # paths checked; the flags as runs record them
from mixsyn_utils.model_card import finish_outputs, training_info  # model card (with measured privacy) and Hub upload
from mixsyn_utils.models import (  # SD / SDXL components, the kind checked before the data is read
    LatentEncoder,
    check_pretrained_model,
    native_resolution,
    text_encoders_of,
    tokenizers_of,
    weight_dtype_of,
)
from mixsyn_utils.outputs import (  # one run per output folder; files staged, moved in whole; a full disk
    OutputLock,
    move_entries_into,
    output_write_errors,
    staging_folder,
)
from mixsyn_utils.placeholders import (  # placeholder names, the token map and the caption rewrite the attacks use
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    TOKEN_MAP_FILE,
    check_tokens_read_back,
    domain_name_pattern,
    domain_slug,
    placeholder_text,
    placeholder_tokens,
    rewrite_caption,
)
from mixsyn_utils.resumable import input_fingerprint  # what the pretrained model was
from mixsyn_utils.training import (  # the batch loss, the output folder, validation
    denoising_batch_loss,
    load_training_components,
    log_validation,
    start_output_dir,
    tracker_config,
    validation_due,
    validation_pipeline,
)
from mixsyn_utils.training_data import TrainingImages, caption_of_row, load_training_images, make_dataloader
from mixsyn_utils.training_flags import (  # the training flag groups and their checks
    TRAINING_PATHS_OR_HUB_IDS,
    add_training_args,
    check_training_args,
    check_training_outputs,
    noise_offset_of,
)
from mixsyn_utils.variants import load_pipeline  # --save_as_full_pipeline: the base pipeline with the new tokens

# Fails with a clear message when the installed diffusers is older than the one these scripts are written for.
check_min_version("0.42.0")

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = ArgumentParser(
        description="MixSyn Textual Inversion: one learned token per domain.", allow_abbrev=False,
        epilog="As upstream's textual_inversion.py, gradients are not clipped (--max_grad_norm 0) and images are "
               "flipped (--no-random_flip turns it off).")
    add_training_args(parser)
    group = parser.add_argument_group("textual inversion")
    group.add_argument("--placeholder_token_template", type=str, default="<{domain}>",
                       help="Placeholder of each domain; '{domain}' is replaced by the domain name's slug (lower "
                            "case, '-' between words), which the tokenizer reads back unchanged.")
    group.add_argument("--placeholder_token", type=str, default=None,
                       help="Upstream's literal placeholder of a single concept, e.g. '<cat-toy>' (lower case: the "
                            "tokenizer lower-cases prompts). Needed with a --train_data_dir of bare images.")
    group.add_argument("--initializer_token", type=str, default=None,
                       help="A one-token word every vector starts from (upstream); default: the mean embedding of "
                            "the domain name's tokens.")
    group.add_argument("--learnable_property", type=str, default="object", choices=["object", "style"],
                       help="Captions of a --train_data_dir of bare images: 'a photo of a <token>' templates "
                            "(object) or 'a painting in the style of <token>' (style).")
    group.add_argument("--repeats", type=int, default=100, help="Passes over the training images per epoch.")
    group.add_argument("--num_vectors", type=int, default=1, help="Embedding vectors per placeholder.")
    group.add_argument("--domain_column", type=str, default="domain",
                       help="Column of --dataset_name naming each image's domain (its name appears in the caption).")
    group.add_argument("--save_steps", type=int, default=500,
                       help="Also save the learned embeddings every N updates (learned_embeds[-<slug>]-steps-N).")
    group.add_argument("--save_as_full_pipeline", action="store_true",
                       help="Also save the whole pipeline with the learned tokens. Unlike upstream, --push_to_hub "
                            "does not imply it: the repo holds the embeddings, loaded onto the base model.")
    group.add_argument("--no_safe_serialization", action="store_true",
                       help="Write the embeddings with torch.save (.bin) instead of safetensors.")
    parser.set_defaults(learning_rate=1e-4, train_batch_size=16, max_train_steps=5000, num_train_epochs=100,
                        output_dir="text-inversion-model", max_grad_norm=0.0, random_flip=True,
                        image_interpolation_mode="bicubic")
    args = parser.parse_args(input_args)
    if "{domain}" not in args.placeholder_token_template:
        raise InputError(f"--placeholder_token_template must contain '{{domain}}', got {args.placeholder_token_template!r}")
    for flag in ("num_vectors", "repeats", "save_steps"):
        if getattr(args, flag) <= 0:
            raise InputError(f"--{flag} must be positive, got {getattr(args, flag)}")
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
        named[domain] = named.get(domain, False) or domain_name_pattern(domain).search(str(caption)) is not None
    silent = [domain for domain, found in named.items() if not found]
    if silent:
        raise InputError(f"no caption of domain {silent[0]!r} contains its name, so its token would never train "
                         "(with --instance_data_dir: --instance_domain must appear in --instance_prompt)")
    return list(named)


def domain_column_of(args):
    """The column naming each image's domain: `domain` for --instance_data_dir (every row the same), else --domain_column."""
    return "domain" if args.instance_data_dir is not None else args.domain_column


def concepts_and_captions(args, training_set):
    """(domains, caption_fn): what the placeholders stand for, and `caption_fn(row, rng, token_map)`.

    Captioned images: the domain column names each image's domain, the caption gets its placeholder. A folder of
    bare images (upstream's --train_data_dir): one concept, captioned with a random `--learnable_property` template.
    """
    rows, caption_column = training_set.rows, training_set.caption_column
    if caption_column is None:
        if not (args.placeholder_token or args.instance_domain):
            raise InputError(f"--train_data_dir {args.train_data_dir} holds images without captions: pass "
                             "--placeholder_token (and --initializer_token) as for upstream's textual_inversion.py")
        domain = args.instance_domain or domain_slug(args.placeholder_token)
        templates = STYLE_TEMPLATES if args.learnable_property == "style" else OBJECT_TEMPLATES

        def template_caption(row, rng, token_map):
            entry = token_map[domain]
            return templates[int(rng.integers(len(templates)))].format(placeholder_text(entry["placeholder"],
                                                                                        entry["num_vectors"]))
        return [domain], template_caption
    domain_column = domain_column_of(args)
    if domain_column not in rows.column_names:
        raise InputError(f"dataset {args.dataset_name or args.train_data_dir} has no column {domain_column!r} (needed "
                         "to know which placeholder each image trains)")
    check_text_column(rows, domain_column, "training set")
    domains = domains_named_in_captions(rows[domain_column], rows[caption_column])
    if args.placeholder_token and len(domains) > 1:
        raise InputError(f"--placeholder_token names one concept, the data has {len(domains)} domains; use "
                         "--placeholder_token_template")

    def rewritten_caption(row, rng, token_map):
        return rewrite_caption(caption_of_row(row, caption_column, rng), row[domain_column], token_map)
    return domains, rewritten_caption


def embeds_file_name(domain, num_domains, steps=None, safe_serialization=True, encoder_index=0):
    """`learned_embeds` (one concept, upstream's name) or `learned_embeds-<slug>`, `-steps-N` for a snapshot; the
    second text encoder's (SDXL) `learned_embeds_2…`, as upstream's textual_inversion_sdxl.py names it."""
    stem = "learned_embeds" + (f"_{encoder_index + 1}" if encoder_index else "")
    stem += "" if num_domains == 1 else f"-{domain_slug(domain)}"
    stem += f"-steps-{steps}" if steps is not None else ""
    return stem + (".safetensors" if safe_serialization else ".bin")


def add_placeholder_tokens(args, domains, tokenizers, text_encoders):
    """Add `<d>`, `<d>_1`, … per domain to every tokenizer, each read back unchanged; initialise their embeddings in
    every text encoder (SDXL: both, as upstream's textual_inversion_sdxl.py).

    Returns {domain: {"placeholder", "file"[, "file_2"], "num_vectors", "token_ids"[, "token_ids_2"]}}. A
    placeholder already in a vocabulary is an error (its old meaning would leak into training). Every vector starts
    from --initializer_token's embedding (a one-token word in every tokenizer, as upstream), else from the mean of
    the domain name's, in each encoder's own embedding table.
    """
    token_map = {}
    for domain in domains:
        placeholder = args.placeholder_token or args.placeholder_token_template.format(domain=domain_slug(domain))
        tokens = placeholder_tokens(placeholder, args.num_vectors)
        entry = {"placeholder": placeholder, "num_vectors": args.num_vectors}
        for index, tokenizer in enumerate(tokenizers):
            # A placeholder the tokenizer already reads as one known token (e.g. "zero" → "zero</w>") would
            # shadow that word, and its old meaning would leak into training.
            pieces = tokenizer.tokenize(placeholder)
            known_word = len(pieces) == 1 and pieces[0] in tokenizer.get_vocab()
            if known_word or tokenizer.add_tokens(tokens) != len(tokens):
                raise InputError(f"placeholder {placeholder!r} of domain {domain!r} is already in the tokenizer's "
                                 "vocabulary (or another domain's); pick another --placeholder_token(_template)")
            check_tokens_read_back(tokenizer, tokens, "--placeholder_token" if args.placeholder_token else
                                   f"--placeholder_token_template (domain {domain!r})")
            suffix = f"_{index + 1}" if index else ""
            entry["file" + suffix] = embeds_file_name(domain, len(domains), None, not args.no_safe_serialization,
                                                      encoder_index=index)
            entry["token_ids" + suffix] = tokenizer.convert_tokens_to_ids(tokens)
        token_map[domain] = entry
    for tokenizer in tokenizers:
        if args.initializer_token is not None and len(tokenizer.encode(args.initializer_token,
                                                                       add_special_tokens=False)) != 1:
            raise InputError(f"--initializer_token {args.initializer_token!r} must be a single token")
    for index, (tokenizer, text_encoder) in enumerate(zip(tokenizers, text_encoders)):
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set just below
        embeddings = text_encoder.get_input_embeddings().weight.data
        with torch.no_grad():
            for domain, entry in token_map.items():
                start_ids = tokenizer.encode(args.initializer_token or domain, add_special_tokens=False)
                embeddings[token_ids_of(entry, index)] = embeddings[start_ids].mean(dim=0)
    return token_map


def token_ids_of(entry, encoder_index):
    """A token-map entry's placeholder ids in the tokenizer of text encoder `encoder_index` (0, or SDXL's 1)."""
    return entry["token_ids" + (f"_{encoder_index + 1}" if encoder_index else "")]


def public_token_map(token_map):
    """The token map as token_map.json and the model card show it: without the tokenizers' ids."""
    return {domain: {k: v for k, v in entry.items() if not k.startswith("token_ids")}
            for domain, entry in token_map.items()}
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


def restore_original_embeddings(text_encoder, original_embeddings, frozen):
    """After each update: put back every `frozen` row of the token embeddings (all but the placeholders': AdamW's
    weight decay would move them)."""
    with torch.no_grad():
        weight = text_encoder.get_input_embeddings().weight
        weight[frozen] = original_embeddings[frozen]


def save_learned_embeds(output_dir, text_encoders, token_map, safe_serialization=True, steps=None):
    """Each domain's {placeholder: (num_vectors, D) float32} in its file per text encoder (upstream's format),
    staged then moved in; the final save (`steps` None) also writes the token map."""
    from safetensors.torch import save_file

    with staging_folder(Path(output_dir) / "learned_embeds") as staging_dir:
        for index, text_encoder in enumerate(text_encoders):
            weight = text_encoder.get_input_embeddings().weight.detach().float().cpu()
            for domain, entry in token_map.items():
                state = {entry["placeholder"]: weight[token_ids_of(entry, index)].contiguous()}
                path = staging_dir / embeds_file_name(domain, len(token_map), steps, safe_serialization, index)
                if safe_serialization:
                    save_file(state, str(path), metadata={"format": "pt"})
                else:
                    torch.save(state, path)
        if steps is None:
            (staging_dir / TOKEN_MAP_FILE).write_text(json.dumps(public_token_map(token_map), indent=2,
                                                                 sort_keys=True))
        move_entries_into(staging_dir, output_dir)


def save_full_pipeline(output_dir, pretrained_model_name_or_path, text_encoders, tokenizers, revision=None,
                       variant=None):
    """--save_as_full_pipeline: the base pipeline with the extended tokenizer(s) and text encoder(s), moved in whole."""
    parts = dict(zip(("text_encoder", "text_encoder_2"), text_encoders), **dict(zip(("tokenizer", "tokenizer_2"),
                                                                                    tokenizers)))
    pipeline = load_pipeline(pretrained_model_name_or_path, revision, variant, **parts)
    with staging_folder(Path(output_dir) / "pipeline") as staging_dir:
        pipeline.save_pretrained(str(staging_dir), safe_serialization=True)
        move_entries_into(staging_dir, output_dir)


def main(args):
    with OutputLock(args.output_dir), OutputLock(args.save_mixed_dataset, "--save_mixed_dataset"):
        check_training_outputs(args)  # again, under the lock: the check and the lock are one step
        check_paths_or_hub_ids(args, *TRAINING_PATHS_OR_HUB_IDS)
        kind = check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # before the data: fails in ms
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
            log_with=args.report_to, project_config=ProjectConfiguration(
                project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))))
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        if args.seed is not None:
            set_seed(args.seed)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        weight_dtype = weight_dtype_of(accelerator.mixed_precision)
        resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)

        # The training set: the self-synthesized images, a --mixup_ratio of them (or of their pixels) perturbed.
        training_set = load_training_images(
            args.dataset_name, args.train_data_dir, args.instance_data_dir,
            dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir, image_column=args.image_column,
            caption_column=args.caption_column, instance_prompt=args.instance_prompt,
            instance_domain=args.instance_domain, max_train_samples=args.max_train_samples, seed=args.seed,
            perturbed_dataset_name=args.perturbed_dataset_name, mixup_mode=args.mixup_mode,
            mixup_ratio=args.mixup_ratio, mixup_seed=args.mixup_seed, mixup_pattern=args.mixup_pattern,
            resolution=args.resolution, captions_required=False)
        domains, caption_fn = concepts_and_captions(args, training_set)
        components = load_training_components(
            args.pretrained_model_name_or_path, args.revision, args.variant, tokenizer_name=args.tokenizer_name,
            prediction_type=args.prediction_type, validation_images=args.validation_images,
            class_labels_conditioning=args.class_labels_conditioning,
            vae_name_or_path=args.pretrained_vae_model_name_or_path)
        unet, vae, noise_scheduler = components.unet, components.vae, components.noise_scheduler
        text_encoders, tokenizers = list(text_encoders_of(components)), tokenizers_of(components)  # SDXL: two of each
        resolution = args.resolution or native_resolution(unet, vae)
        token_map = add_placeholder_tokens(args, domains, tokenizers, text_encoders)

        for model in (unet, vae, *text_encoders):
            model.requires_grad_(False)
            model.to(accelerator.device)
        if weight_dtype != torch.float32:
            unet.to(dtype=weight_dtype)
            vae.to(dtype=weight_dtype)
        for text_encoder in text_encoders:
            text_encoder.get_input_embeddings().requires_grad_(True)
            if args.gradient_checkpointing:
                text_encoder.gradient_checkpointing_enable()
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()

        if training_set.caption_column is not None:  # a placeholder past the tokenizer's cut would never train
            domains_of_rows = training_set.rows[domain_column_of(args)]
            captions = [rewrite_caption(caption, domain, token_map) for caption, domain in
                        zip(training_set.rows[training_set.caption_column], domains_of_rows)
                        if isinstance(caption, str)]
            check_placeholders_within_limit(tokenizers[0], captions, token_map,
                                            row_names(training_set.rows, "training set"))
        # --repeats: each epoch passes over the images that many times (upstream's dataset length).
        rows = training_set.rows.select(np.tile(np.arange(len(training_set.rows)), args.repeats))
        train_dataset = TrainingImages(
            rows, tokenizers, resolution, lambda row, rng: caption_fn(row, rng, token_map), center_crop=args.center_crop,
            random_flip=args.random_flip, seed=args.seed, interpolation=args.image_interpolation_mode,
            max_length=args.tokenizer_max_length)
        train_dataloader, batch_sampler = make_dataloader(train_dataset, args.train_batch_size, args.seed, accelerator,
                                                          args.dataloader_num_workers)

        # Updates per epoch and in total (upstream's rule: --max_train_steps wins over --num_train_epochs).
        updates_per_epoch = math.ceil(batch_sampler.batches_per_epoch() / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
        num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
        learning_rate = args.learning_rate
        if args.scale_lr:
            learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        params_to_optimize = [p for text_encoder in text_encoders for p in text_encoder.get_input_embeddings().parameters()]
        if args.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer_class = bnb.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        optimizer = optimizer_class(params_to_optimize, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                    weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        # × processes: the prepared scheduler steps once per process at every update.
        lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer, step_rules=args.lr_step_rules,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles,
            power=args.lr_power)
        *text_encoders, optimizer, lr_scheduler = accelerator.prepare(*text_encoders, optimizer, lr_scheduler)
        register_pretrained_checkpoint_hooks(accelerator)
        # A resumed run must have the checkpoint's flags, inputs and process count; it then skips the batches already
        # trained on. Checked before the output folder is touched, loaded once the models are prepared.
        inputs = dict(training_set.fingerprints,
                      pretrained_model=input_fingerprint(args.pretrained_model_name_or_path, args.revision))
        signature = training_signature(flag_values(args), inputs)
        check_resume(resume_path, signature, accelerator.num_processes, accelerator.process_index)
        start_output_dir(accelerator, args.output_dir, args.overwrite)  # --overwrite empties it once inputs are checked
        # From here on the run writes: a failed write (a full disk) is one line naming --output_dir, and a
        # folder holding only what the run wrote before its first checkpoint (logs, staging) is removed.
        with removed_if_nothing_finished(accelerator, args.output_dir, args.logging_dir), \
                output_write_errors(args.output_dir):
            if args.save_mixed_dataset and accelerator.is_main_process:  # once every input and the model have loaded
                save_dataset(training_set.rows, args.save_mixed_dataset, flag="--save_mixed_dataset")
            if accelerator.is_main_process:
                accelerator.init_trackers("mixsyn-textual-inversion", config=tracker_config(flag_values(args)))
            global_step = load_resume_state(accelerator, resume_path)
            first_epoch = global_step // updates_per_epoch
            batch_sampler.resume_at(first_epoch, (global_step % updates_per_epoch) * args.gradient_accumulation_steps)
            # Only the placeholders' rows train: every other row is put back after each update (per text encoder).
            original_embeddings, frozen_rows = [], []
            for index, text_encoder in enumerate(text_encoders):
                original_embeddings.append(accelerator.unwrap_model(text_encoder).get_input_embeddings().weight.detach().clone())
                frozen_rows.append(torch.ones(len(original_embeddings[-1]), dtype=torch.bool,
                                              device=original_embeddings[-1].device))
                frozen_rows[-1][[i for entry in token_map.values() for i in token_ids_of(entry, index)]] = False

            def validate(step):
                images = []
                if accelerator.is_main_process:
                    parts = dict(zip(("text_encoder", "text_encoder_2"), text_encoders),
                                 **dict(zip(("tokenizer", "tokenizer_2"), tokenizers)))
                    pipeline = validation_pipeline(args.pretrained_model_name_or_path, accelerator,
                                                   args.validation_scheduler, args.revision, args.variant,
                                                   vae=vae, **parts)
                    images = log_validation(pipeline, accelerator, args.validation_prompt, args.num_validation_images,
                                            args.seed, step, resolution)
                accelerator.wait_for_everyone()
                return images

            logger.info("***** Running training *****")
            logger.info(f"  Num examples = {len(train_dataset)}, "
                        f"batches per epoch = {batch_sampler.batches_per_epoch()}")
            logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
            logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
            logger.info(f"  Total optimization steps = {max_train_steps}")
            if global_step > 0:
                logger.info(f"  Resuming at step {global_step} (epoch {first_epoch})")
            progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                                disable=not accelerator.is_local_main_process)
            latent_encoder = LatentEncoder(vae)
            eos_token_id = tokenizers[0].eos_token_id if args.text_encoder_use_attention_mask else None
            validation_images, validated_step = [], None
            for epoch in range(first_epoch, num_train_epochs):
                for text_encoder in text_encoders:
                    text_encoder.train()
                train_dataloader.set_epoch(epoch)  # the order, crops and captions are functions of (seed, epoch)
                for batch in train_dataloader:
                    with accelerator.accumulate(*text_encoders):
                        loss, logs = denoising_batch_loss(
                            batch, unet, latent_encoder, text_encoders, noise_scheduler, weight_dtype, resolution,
                            snr_gamma=args.snr_gamma, noise_offset=noise_offset_of(args),
                            attention_mask_eos_id=eos_token_id,
                            class_labels_from_timesteps=args.class_labels_conditioning == "timesteps")
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    if not accelerator.sync_gradients:  # an update happens every accumulation steps
                        continue
                    global_step += 1
                    for text_encoder, original, frozen in zip(text_encoders, original_embeddings, frozen_rows):
                        restore_original_embeddings(accelerator.unwrap_model(text_encoder), original, frozen)
                    if global_step % args.save_steps == 0 and accelerator.is_main_process:
                        save_learned_embeds(args.output_dir, [accelerator.unwrap_model(e) for e in text_encoders],
                                            token_map, not args.no_safe_serialization, steps=global_step)
                    progress_bar.update(1)
                    logs = {"loss": loss.detach().item(), **logs, "lr": lr_scheduler.get_last_lr()[0]}
                    progress_bar.set_postfix(**logs)
                    accelerator.log(logs, step=global_step)
                    if global_step % args.checkpointing_steps == 0:
                        save_checkpoint(accelerator, args.output_dir, global_step, signature,
                                        args.checkpoints_total_limit)
                    if args.validation_prompt and validation_due(global_step, validation_steps=args.validation_steps):
                        validation_images, validated_step = validate(global_step), global_step
                    if global_step >= max_train_steps:
                        break
                if args.validation_prompt and validated_step != global_step and validation_due(
                        global_step, validation_epochs=args.validation_epochs, epoch_end=epoch):
                    validation_images, validated_step = validate(global_step), global_step
                if global_step >= max_train_steps:
                    break
            progress_bar.close()
            if args.validation_prompt and validated_step != global_step:  # the model card shows the final weights
                validation_images = validate(global_step)
            accelerator.wait_for_everyone()

            if accelerator.is_main_process:
                save_learned_embeds(args.output_dir, [accelerator.unwrap_model(e) for e in text_encoders], token_map,
                                    not args.no_safe_serialization)
                if args.save_as_full_pipeline:
                    save_full_pipeline(args.output_dir, args.pretrained_model_name_or_path,
                                       [accelerator.unwrap_model(e) for e in text_encoders], tokenizers, args.revision,
                                       args.variant)
            info = training_info(
                "textual_inversion", f"Textual Inversion ({args.num_vectors} vector(s) per domain)",
                pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision,
                dataset_name=args.dataset_name, source=training_set.source, mix_info=training_set.mix_info,
                trained={"steps": max_train_steps, "learning_rate": learning_rate, "resolution": resolution},
                num_images=len(training_set.rows), instance_prompt=args.instance_prompt,
                validation_prompt=args.validation_prompt, tokens=public_token_map(token_map), base_kind=kind,
                vae_name_or_path=args.pretrained_vae_model_name_or_path)
            finish_outputs(accelerator, args.output_dir, info, validation_images, privacy_report=args.privacy_report,
                           push=args.push_to_hub, hub_model_id=args.hub_model_id, hub_token=args.hub_token)


if __name__ == "__main__":
    run_cli(main, parse_args)
