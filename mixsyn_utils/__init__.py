"""Shared code for the mixsyn scripts. Each submodule holds one topic; the maths lives in one place each:

- `data`       datasets in/out, preprocessing, atomic outputs, resumable shards
- `models`     loading SD components, prompt and image encoding
- `diffusion`  ᾱ_t, forward noising, loss scores (attack maths)
- `metrics`    ROC metrics
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
