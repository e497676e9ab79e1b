"""The whole MixSyn chain on an SDXL model, with tiny settings: self-synthesis → Anti-DreamBooth ASPL with the LoRA
surrogate (SDXL's default) → LoRA MixSyn fine-tuning on the mix → the six attacks on the fine-tuned weights →
`evaluate.py --generate --write_card`, whose card carries the numbers of exactly those weights."""

import json

from datasets import load_from_disk
from train_fixtures import run_in_process

import attack_clid
import attack_loss
import attack_pfami
import attack_pia
import attack_secmi
import evaluate
import perturb_antidreambooth
import train_lora_mixsyn
from mixsyn_utils.resumable import model_weights_digest, weights_digest

# Each attack at a cost-bounded setting: (script, name, flags).
ATTACKS = [
    (attack_loss, "loss", ["--method", "loss", "--attack_timesteps", "450"]),
    (attack_loss, "sima", ["--method", "sima", "--attack_timesteps", "0", "10"]),
    (attack_pia, "pia", ["--attack_timesteps", "200", "--guidance_scale", "7.5"]),
    (attack_secmi, "secmi", ["--t_sec", "20", "--k", "10"]),
    (attack_clid, "clid", ["--attack_timesteps", "450", "--weak_caption", "0.5", "null"]),
    (attack_pfami, "pfami", ["--attack_timesteps", "100", "--crop_strengths", "0.8"]),
]


def test_sdxl_synthesis_aspl_lora_attacks_and_card(tiny_sdxl_victim, sdxl_synthetic_dataset, tmp_path):
    victim = tiny_sdxl_victim
    model = ["--pretrained_model_name_or_path", str(victim / "pipeline")]
    perturbed = tmp_path / "perturbed"
    perturb_antidreambooth.main(perturb_antidreambooth.parse_args(model + [
        "--dataset_name", str(sdxl_synthetic_dataset), "--learning_rate", "5e-4", "--max_train_steps", "1",
        "--max_f_train_steps", "1", "--max_adv_train_steps", "1", "--gradient_checkpointing", "--pgd_batch_size", "1",
        "--output_dir", str(perturbed)]))
    perturbed_set = load_from_disk(str(perturbed))
    provenance = json.loads(perturbed_set.info.description)
    assert provenance["flags"]["surrogate"] is None and max(perturbed_set["linf"]) <= 0.05 + 1e-9
    assert 0 < max(perturbed_set["linf"])  # PGD moved the pixels

    lora = tmp_path / "lora"
    run_in_process(train_lora_mixsyn, model + [
        "--dataset_name", str(sdxl_synthetic_dataset), "--perturbed_dataset_name", str(perturbed), "--mixup_mode",
        "image", "--mixup_ratio", "0.5", "--max_train_steps", "2", "--train_batch_size", "2", "--learning_rate",
        "1e-3", "--lr_warmup_steps", "0", "--seed", "0", "--output_dir", str(lora)])

    data = ["--member_dataset", str(victim / "members"), "--nonmember_dataset", str(victim / "nonmembers"),
            "--lora_weights", str(lora), "--latents_cache_dir", str(tmp_path / "latents")]
    scores = []
    for script, name, flags in ATTACKS:
        scores.append(tmp_path / "scores" / name)
        script.main(script.parse_args(model + data + flags + ["--output_dir", str(scores[-1])]))
        info = json.loads(load_from_disk(str(scores[-1])).info.description)
        # the LoRA file and the SDXL base it was fused into, each by its sha256
        assert info["model"]["weights_sha256"] == {"lora_weights": weights_digest(lora),
                                                   "pretrained_model_name_or_path": model_weights_digest(str(victim / "pipeline"))}
        assert info["time_ids"] == [16, 16, 0, 0, 16, 16]

    results = evaluate.main(evaluate.parse_args(model + [
        "--lora_weights", str(lora), "--scores", *map(str, scores), "--member_dataset", str(victim / "members"),
        "--nonmember_dataset", str(victim / "nonmembers"), "--generate", "--domains_file",
        str(victim / "domains.json"), "--num_images_per_prompt", "1", "--num_inference_steps", "2",
        "--sample_batch_size", "20", "--rprecision_model", str(victim / "rprecision_model"), "--no_brisque",
        "--bootstrap", "20", "--output_dir", str(tmp_path / "eval"), "--write_card", str(lora)]))
    assert len(results["privacy"]) == 6 and results["utility"]["r_precision_top1_x100"] is not None
    card = (lora / "README.md").read_text()
    assert f"`{weights_digest(lora)}`" in card and "Measured on exactly these weights" in card
    assert "license: openrail++" in card and "(worst case)" in card
    for name in ("loss", "sima", "pia", "secmi", "clid", "pfami"):
        assert f"| {name}" in card
