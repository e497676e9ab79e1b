"""Specification of the attack scripts: SecMI, PIA, PIAN, loss, SimA, CLiD and PFAMI on member / non-member images.

Their maths is checked against a float64 reference in test_diffusion.py; here: UNet calls per image (forward
hook), v-prediction models, calibration splits, the scores dataset contract with evaluate.py, distribution,
resume, bad input, captions and z₀ options.
"""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from attack_fixtures import ATTACK_RUNS, PIA_TIMESTEPS, as_velocity_model, common_argv, members_lower_auc, run_attack
from conftest import launch

import attack_clid
import attack_loss
import attack_pfami
import attack_pia
import attack_secmi
import make_tiny_victim
from mixsyn_utils import attacks as attacks_module
from mixsyn_utils import resumable
from mixsyn_utils.attacks import load_attack_data
from mixsyn_utils.cli import InputError
from mixsyn_utils.variants import load_model_variant


def attack_rows(args):
    """The members and non-members an attack script loads from its parsed flags (as its `main` does)."""
    return load_attack_data(args.member_dataset, args.nonmember_dataset, args.caption_column, args.null_prompt,
                            args.textual_inversion)


def calibration_of(dataset):
    return json.loads(dataset.info.description).get("calibration")


# ----------------------------------------------------------------------------------------------
# Work done: exact UNet calls per image
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ATTACK_RUNS))
def test_unet_rows_per_image(attack_runs, name):
    """Every image (calibration images too) costs exactly the documented UNet rows, guidance rows included."""
    dataset, unet_samples = attack_runs[name]
    calibration = calibration_of(dataset)
    num_images = len(dataset) + (len(calibration["ids"]) if calibration else 0)
    assert unet_samples == ATTACK_RUNS[name][2] * num_images


# ----------------------------------------------------------------------------------------------
# v-prediction: ε̂ is derived from the UNet output by the scheduler's prediction_type
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ATTACK_RUNS))
def test_v_prediction_model_gives_the_epsilon_models_scores(attack_runs, tiny_victim, tmp_path, name):
    """Every score column to 1e-3 relative, plus 1e-4 of the column's largest value: CLiD's D (a difference of
    losses equal to 4-6 digits here) moves by float32 rounding when ε̂ goes through v."""
    script, flags, _ = ATTACK_RUNS[name]
    expected, _ = attack_runs[name]
    velocity, _ = run_attack(script, common_argv(tiny_victim, tmp_path / name, *flags, "--batch_size", 24),
                             model_wrapper=as_velocity_model)
    assert velocity["id"] == expected["id"]
    for column in [c for c in expected.column_names if expected.features[c].dtype == "float64"]:
        np.testing.assert_allclose(velocity[column], expected[column], rtol=1e-3,
                                   atol=1e-4 * np.abs(expected[column]).max(), err_msg=column)


# ----------------------------------------------------------------------------------------------
# Calibration splits: nothing is fitted on the images that are scored
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clid", "sima"])
def test_calibration_split_is_disjoint_from_scored_images_and_reproducible(attack_runs, tiny_victim, name):
    from mixsyn_utils.metrics import calibration_split
    from mixsyn_utils.seeds import SALT_ATTACK_CALIBRATION, derive_seed

    dataset, _ = attack_runs[name]
    calibration = calibration_of(dataset)
    rows = [row for split in ("members", "nonmembers")
            for row in datasets.load_from_disk(str(tiny_victim / split)).select_columns(["id", "domain"])]
    is_member = np.arange(len(rows)) < len(rows) // 2
    mask = calibration_split(is_member, [row["domain"] for row in rows], derive_seed(0, SALT_ATTACK_CALIBRATION), 0.2)
    assert not set(calibration["ids"]) & set(dataset["id"])
    assert sorted(calibration["ids"] + list(dataset["id"])) == sorted(row["id"] for row in rows)
    assert calibration["ids"] == [row["id"] for row, calibrating in zip(rows, mask) if calibrating]
    assert calibration["num_members"] == calibration["num_nonmembers"] == 10


def test_clid_alpha_and_scalers_are_those_fitted_on_calibration_rows():
    """clid_threshold_fit = sklearn's RobustScaler on (L, −D) + the α of {0, 0.1, …, 1} with the best AUC."""
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import RobustScaler

    from mixsyn_utils.metrics import clid_threshold_fit, clid_threshold_score

    rng = np.random.default_rng(0)
    is_member = np.arange(60) < 30
    losses = rng.normal(1.0, 0.3, 60) - 0.1 * is_member
    discrepancies = rng.normal(0.1, 0.05, 60) + 0.04 * is_member
    fit = clid_threshold_fit(losses, discrepancies, is_member)
    scaled = RobustScaler().fit_transform(np.stack([losses, -discrepancies], 1))
    aucs = [roc_auc_score(~is_member, (1 - alpha) * scaled[:, 0] + alpha * scaled[:, 1])
            for alpha in np.round(np.arange(11) * 0.1, 1)]
    assert fit["alpha"] == round(0.1 * int(np.argmax(aucs)), 1) and 0 < fit["alpha"] < 1
    np.testing.assert_allclose(clid_threshold_score(fit, losses, discrepancies),
                               (1 - fit["alpha"]) * scaled[:, 0] + fit["alpha"] * scaled[:, 1], rtol=1e-12)


@pytest.mark.parametrize("script,flags", [
    (attack_clid, []), (attack_loss, ["--method", "sima", "--attack_timesteps", 0, 10]),
])
def test_calibration_split_smaller_than_needed_is_refused(tiny_victim, tmp_path, script, flags):
    two_domains = {}
    for split in ("members", "nonmembers"):  # 4 + 4 images in each of 2 domains: 2 + 2 calibration images
        dataset = datasets.load_from_disk(str(tiny_victim / split))
        two_domains[split] = tmp_path / split
        dataset.filter(lambda row: row["domain"] in ("zero", "one")).save_to_disk(str(two_domains[split]))
    argv = common_argv(tiny_victim, tmp_path / "out", *flags) + [
        "--member_dataset", two_domains["members"], "--nonmember_dataset", two_domains["nonmembers"]]
    with pytest.raises(InputError, match="gives 2 member and 2 non-member calibration images; .* needs at least 10 "
                                         "of each") as error:
        script.main(script.parse_args([str(a) for a in argv]))
    assert "\n" not in str(error.value)


def test_clid_weakened_captions_cut_the_rarest_words_first(tiny_victim):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_victim / "pipeline"), subfolder="tokenizer")
    assert tokenizer("<|endoftext|>", add_special_tokens=False).input_ids == [tokenizer.eos_token_id]
    caption = "a photo of the seven"
    assert attack_clid.weakened_caption(caption, "null", tokenizer) == ""
    assert attack_clid.weakened_caption(caption, 0.3, tokenizer) == "a <|endoftext|> of the <|endoftext|>"
    assert attack_clid.weakened_caption(caption, 0.7, tokenizer) == "a " + " ".join(["<|endoftext|>"] * 4)


# ----------------------------------------------------------------------------------------------
# Output contract with evaluate.py
# ----------------------------------------------------------------------------------------------

def test_scores_dataset_contract(attack_runs, tiny_victim):
    dataset, _ = attack_runs["pia"]
    members = datasets.load_from_disk(str(tiny_victim / "members"))
    assert dataset.column_names[:4] == ["id", "domain", "is_member", "score"]
    assert {dataset.features[c].dtype for c in ("id", "domain")} == {"string"}
    assert dataset.features["is_member"].dtype == "bool"
    assert dataset.features["score"].dtype == "float64"
    assert sorted(c for c in dataset.column_names if c.startswith("score_t")) == [f"score_t{t}" for t in PIA_TIMESTEPS]
    assert sum(dataset["is_member"]) == len(members)
    assert set(members["id"]) == {i for i, m in zip(dataset["id"], dataset["is_member"]) if m}
    info = json.loads(dataset.info.description)
    assert info["attack"] == "pia" and info["member_is_lower"] is True
    assert info["model"]["pretrained_model_name_or_path"] == str(tiny_victim / "pipeline")
    assert {"flags", "versions"} <= set(info) and "torch" in info["versions"]


# ----------------------------------------------------------------------------------------------
# Membership signal on a victim that memorises its members
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def memorising_victim(tmp_path_factory):
    """1 member per domain, 150 UNet steps, light EMA: the UNet memorises its 10 members (~20 s on 2 cores)."""
    victim_dir = tmp_path_factory.mktemp("memorising") / "victim"
    make_tiny_victim.main(make_tiny_victim.parse_args([
        "--output_dir", str(victim_dir), "--members_per_domain", "1", "--nonmembers_per_domain", "4",
        "--vae_steps", "40", "--unet_steps", "150", "--train_batch_size", "10", "--ema_decay", "0.9", "--rprecision_steps", "10", "--skip_report",
        # plain MSE (no Min-SNR weighting), so the small-t error SecMI and PIA read is trained as hard as the rest
        "--snr_gamma", "0",
    ]))
    return victim_dir


def test_attacks_separate_members_from_nonmembers(memorising_victim, tmp_path):
    pia, _ = run_attack(attack_pia, common_argv(memorising_victim, tmp_path / "pia", "--attack_timesteps", 200))
    secmi, _ = run_attack(attack_secmi, common_argv(memorising_victim, tmp_path / "secmi"))
    aucs = {"pia": members_lower_auc(pia), "secmi": members_lower_auc(secmi)}
    print(f"\nAUC (members-lower convention; < 0.5 means members score HIGHER): {aucs}")
    assert max(abs(auc - 0.5) for auc in aucs.values()) >= 0.15


# ----------------------------------------------------------------------------------------------
# Distribution and resume
# ----------------------------------------------------------------------------------------------

def test_one_and_two_processes_give_identical_scores(tiny_victim, tmp_path):
    argv = ["--t_sec", 20, "--k", 10, "--batch_size", 16]
    env = {"OMP_NUM_THREADS": "1"}
    launch("attack_secmi.py", common_argv(tiny_victim, tmp_path / "one", *argv), num_processes=1, env=env)
    launch("attack_secmi.py", common_argv(tiny_victim, tmp_path / "two", *argv), num_processes=2, env=env)
    one, two = (datasets.load_from_disk(str(tmp_path / name)) for name in ("one", "two"))
    assert one["id"] == two["id"]
    assert one["score"] == two["score"]


def test_killed_run_resumes_without_recomputing_finished_batches(tiny_victim, tmp_path, monkeypatch):
    argv = common_argv(tiny_victim, tmp_path / "scores", "--batch_size", 16, "--attack_timesteps", 100)
    reference, _ = run_attack(attack_pia, common_argv(tiny_victim, tmp_path / "full", "--batch_size", 16,
                                                      "--attack_timesteps", 100))
    original_save, saved = resumable.ResumableWork._save, []

    def save_then_die(self, unit, dataset):
        original_save(self, unit, dataset)
        saved.append(unit)
        if len(saved) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(resumable.ResumableWork, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        attack_pia.main(attack_pia.parse_args(argv))
    monkeypatch.undo()
    resumed, unet_samples = run_attack(attack_pia, argv)
    # (1 + 1) calls × 2 guidance rows per image; the two finished batches are not recomputed
    assert unet_samples == 4 * (len(resumed) - 2 * 16)
    assert resumed["score"] == reference["score"]
    assert not (tmp_path / "scores.partial").exists()


# ----------------------------------------------------------------------------------------------
# Bad input: one-line InputError naming the flag, before any model is loaded
# ----------------------------------------------------------------------------------------------

def argv_with_changed_nonmember(tiny_victim, tmp_path, column, member_row, nonmember_row):
    """Attack flags whose non-member set has non-member `nonmember_row`'s `column` copied from member `member_row`."""
    members = datasets.load_from_disk(str(tiny_victim / "members"))
    nonmembers = [dict(row) for row in datasets.load_from_disk(str(tiny_victim / "nonmembers"))]
    nonmembers[nonmember_row][column] = members[member_row][column]
    path = tmp_path / "nonmembers"
    datasets.Dataset.from_list(nonmembers).cast_column("image", datasets.Image()).save_to_disk(str(path))
    return common_argv(tiny_victim, tmp_path / "out") + ["--nonmember_dataset", str(path)], members[member_row]["id"]


def test_shared_id_between_sets_is_refused(tiny_victim, tmp_path):
    argv, member_id = argv_with_changed_nonmember(tiny_victim, tmp_path, "id", member_row=0, nonmember_row=3)
    with pytest.raises(InputError, match=f"share 1 id.*{member_id}"):
        attack_rows(attack_pia.parse_args(argv))


def test_identical_pixels_under_another_id_are_refused(tiny_victim, tmp_path):
    argv, member_id = argv_with_changed_nonmember(tiny_victim, tmp_path, "image", member_row=2, nonmember_row=5)
    with pytest.raises(InputError, match=f"identical pixels.*{member_id}"):
        attack_rows(attack_pia.parse_args(argv))


def test_empty_set_is_refused(tiny_victim, tmp_path):
    (tmp_path / "empty").mkdir()
    argv = common_argv(tiny_victim, tmp_path / "out") + ["--member_dataset", str(tmp_path / "empty")]
    with pytest.raises(InputError, match="empty"):
        attack_pia.main(attack_pia.parse_args(argv))


def test_none_caption_is_refused_naming_the_column_and_row(tiny_victim, tmp_path):
    nonmembers = datasets.load_from_disk(str(tiny_victim / "nonmembers"))
    row_id = nonmembers[3]["id"]
    nonmembers.map(lambda row: {"prompt": None if row["id"] == row_id else row["prompt"]}).save_to_disk(
        str(tmp_path / "none_caption"))
    argv = common_argv(tiny_victim, tmp_path / "out") + ["--nonmember_dataset", str(tmp_path / "none_caption")]
    with pytest.raises(InputError, match=rf"none_caption row id {row_id}: column 'prompt' is None$"):
        attack_rows(attack_pia.parse_args(argv))


def test_an_image_that_does_not_decode_fails_before_scoring_and_leaves_nothing(tiny_victim, tmp_path):
    members = [dict(row) for row in datasets.load_from_disk(str(tiny_victim / "members"))]
    members[2]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n cut here", "path": None}
    datasets.Dataset.from_list(members).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "bad"))
    argv = common_argv(tiny_victim, tmp_path / "out") + ["--member_dataset", str(tmp_path / "bad")]
    with pytest.raises(InputError, match=rf"bad row id {members[2]['id']}: cannot decode \("):
        attack_pia.main(attack_pia.parse_args(argv))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_caption_column_is_refused(tiny_victim, tmp_path):
    argv = common_argv(tiny_victim, tmp_path / "out", "--caption_column", "text")
    with pytest.raises(InputError, match="no column 'text'"):
        attack_pia.main(attack_pia.parse_args(argv))


@pytest.mark.parametrize("script,flags", [
    (attack_clid, []), (attack_loss, ["--method", "loss"]), (attack_loss, ["--method", "sima"]), (attack_pfami, []),
])
def test_empty_caption_is_refused_by_every_caption_conditioned_attack(tiny_victim, tmp_path, script, flags):
    nonmembers = [dict(row) for row in datasets.load_from_disk(str(tiny_victim / "nonmembers"))]
    nonmembers[3]["prompt"] = "  "
    path = tmp_path / "nonmembers"
    datasets.Dataset.from_list(nonmembers).cast_column("image", datasets.Image()).save_to_disk(str(path))
    argv = common_argv(tiny_victim, tmp_path / "out", *flags) + ["--nonmember_dataset", str(path)]
    row_id = nonmembers[3]["id"]
    with pytest.raises(InputError, match=f"--nonmember_dataset {path} row id {row_id}: column 'prompt' is empty") as error:
        script.main(script.parse_args(argv))
    assert "\n" not in str(error.value)


def test_clid_without_captions_is_refused(tiny_victim, tmp_path):
    with pytest.raises(InputError, match="--null_prompt leaves CLiD no caption"):
        attack_clid.parse_args(common_argv(tiny_victim, tmp_path / "out", "--null_prompt"))


def test_unknown_prediction_type_of_the_attacked_model_is_refused(tiny_victim, tmp_path):
    def flow_model(components):
        components.noise_scheduler.register_to_config(prediction_type="flow")
        return components

    with pytest.raises(InputError, match="prediction_type 'flow'; the attacks handle") as error:
        run_attack(attack_pia, common_argv(tiny_victim, tmp_path / "out"), model_wrapper=flow_model)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("script,flags,flag", [
    (attack_pia, ["--attack_timesteps", 1000], "--attack_timesteps"),
    (attack_pia, ["--attack_timesteps", 0], "--attack_timesteps"),
    (attack_secmi, ["--t_sec", 1000, "--k", 10], "--t_sec"),
])
def test_timestep_outside_schedule_is_refused(tiny_victim, tmp_path, script, flags, flag):
    with pytest.raises(InputError, match=f"{flag} must be in \\(0, "):
        script.main(script.parse_args(common_argv(tiny_victim, tmp_path / "out", *flags)))


def test_t_sec_not_multiple_of_k_is_refused(tiny_victim, tmp_path):
    with pytest.raises(InputError, match="--t_sec must be a multiple of --k"):
        attack_secmi.parse_args(common_argv(tiny_victim, tmp_path / "out", "--t_sec", 105, "--k", 10))


def make_lora(path, in_width):
    """A one-layer LoRA on the first cross-attention query projection, with the given input width."""
    from diffusers import StableDiffusionPipeline

    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    generator = torch.Generator().manual_seed(0)
    layers = {f"{module}.lora.down.weight": torch.randn(4, in_width, generator=generator),
              f"{module}.lora.up.weight": torch.randn(32, 4, generator=generator)}
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers={k[5:]: v for k, v in layers.items()})
    return path


def test_lora_that_does_not_match_the_unet_is_refused(tiny_victim, tmp_path):
    lora = make_lora(tmp_path / "lora", in_width=48)  # the tiny UNet's layer is 32 wide
    with pytest.raises(InputError, match="--lora_weights .* does not match the model"):
        load_model_variant(str(tiny_victim / "pipeline"), lora_weights=str(lora))


def test_matching_lora_is_fused_into_the_attacked_unet(tiny_victim, tmp_path):
    lora = make_lora(tmp_path / "lora", in_width=32)
    base = load_model_variant(str(tiny_victim / "pipeline")).unet
    adapted = load_model_variant(str(tiny_victim / "pipeline"), lora_weights=str(lora)).unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(base.state_dict()[name], adapted.state_dict()[name])
    assert not any("lora" in key for key in adapted.state_dict())


def test_model_parts_load_without_unpickling_and_a_pickled_lora_is_refused(tiny_victim, tmp_path, monkeypatch):
    import pickle

    from safetensors.torch import load_file

    lora = make_lora(tmp_path / "lora", in_width=32)
    (tmp_path / "pickled").mkdir()
    weights = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    torch.save(weights, tmp_path / "pickled" / "pytorch_lora_weights.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("a file was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    load_model_variant(str(tiny_victim / "pipeline"), unet_path=str(tiny_victim / "pipeline"), lora_weights=str(lora))
    with pytest.raises(InputError, match="cannot load --lora_weights .*pickled as safetensors"):
        load_model_variant(str(tiny_victim / "pipeline"), lora_weights=str(tmp_path / "pickled"))


# ----------------------------------------------------------------------------------------------
# Captions: textual-inversion placeholders and the null-prompt control
# ----------------------------------------------------------------------------------------------

def test_textual_inversion_captions_use_learned_placeholders(tiny_victim, tmp_path):
    token_map = {"three": {"placeholder": "<three>", "file": "learned_embeds-three.safetensors", "num_vectors": 2}}
    (tmp_path / "ti").mkdir()
    (tmp_path / "ti" / "token_map.json").write_text(json.dumps(token_map))
    rows = attack_rows(attack_pia.parse_args(common_argv(tiny_victim, tmp_path / "out",
                                                              "--textual_inversion", tmp_path / "ti")))
    three = [row["caption"] for row in rows if row["domain"] == "three"]
    assert three and all(c.endswith("<three> <three>_1") for c in three)
    assert all("<" not in row["caption"] for row in rows if row["domain"] != "three")


def test_null_prompt_conditions_on_the_empty_caption(tiny_victim, tmp_path):
    rows = attack_rows(attack_pia.parse_args(common_argv(tiny_victim, tmp_path / "out", "--null_prompt")))
    assert {row["caption"] for row in rows} == {""}


# ----------------------------------------------------------------------------------------------
# z₀ options: posterior samples (--vae_sample) and the latents cache shared across attacked models
# ----------------------------------------------------------------------------------------------

def test_vae_sample_draws_mean_plus_std_noise_seeded_per_image(tiny_victim):
    from mixsyn_utils.attacks import encode_batch_latents
    from mixsyn_utils.images import image_to_tensor
    from mixsyn_utils.seeds import derive_seed

    args = attack_pia.parse_args(common_argv(tiny_victim, "unused", "--vae_sample", "--seed", 3))
    rows = attack_rows(args)[:5]
    vae = load_model_variant(str(tiny_victim / "pipeline")).vae.double()
    first_index = 7  # the rows' global position decides their draws, not their batch
    sampled = encode_batch_latents(vae, rows, 16, sample=True, seed=3, first_index=first_index)
    mode = encode_batch_latents(vae, rows, 16, sample=False, seed=3, first_index=first_index)
    for i, row in enumerate(rows):
        pixels = image_to_tensor(row["source"][0][row["source"][1]]["image"], 16)[None].double()
        mean, logvar = vae.quant_conv(vae.encoder(pixels)).chunk(2, dim=1)
        noise = torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(derive_seed(3, first_index + i)))
        expected = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise.double()) * vae.config.scaling_factor
        torch.testing.assert_close(sampled[i : i + 1], expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(mode[i : i + 1], mean * vae.config.scaling_factor, rtol=1e-9, atol=1e-9)
    assert (sampled - mode).abs().max() > 1e-3


def test_vae_sample_scores_do_not_depend_on_batch_size_but_on_seed(tiny_victim, tmp_path):
    def scores(name, *flags):  # unguided: guidance 7.5 multiplies the float32 rounding that differs by batch shape
        dataset, _ = run_attack(attack_pia, common_argv(tiny_victim, tmp_path / name, "--attack_timesteps", 100,
                                                        "--guidance_scale", 1, *flags))
        return np.asarray(dataset["score"])

    by_16 = scores("b16", "--vae_sample", "--batch_size", 16)
    np.testing.assert_allclose(scores("b24", "--vae_sample", "--batch_size", 24), by_16, rtol=1e-5)
    assert np.abs(scores("seed1", "--vae_sample", "--batch_size", 16, "--seed", 1) - by_16).max() > 0
    assert np.abs(scores("mode", "--batch_size", 16) - by_16).max() > 0


def test_latents_cache_is_reused_across_models_with_the_same_vae(tiny_victim, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    encoded = []
    original_encode = attacks_module.encode_batch_latents
    monkeypatch.setattr(attacks_module, "encode_batch_latents",
                        lambda vae, rows, *a, **k: encoded.append(len(rows)) or original_encode(vae, rows, *a, **k))
    cache = ["--latents_cache_dir", tmp_path / "cache", "--batch_size", 16]
    one_t = ["--attack_timesteps", 100, "--guidance_scale", 1]  # two UNet calls per image: the cache is under test
    uncached, _ = run_attack(attack_pia, common_argv(tiny_victim, tmp_path / "plain", *one_t, "--batch_size", 16))
    first, _ = run_attack(attack_pia, common_argv(tiny_victim, tmp_path / "first", *one_t, *cache))
    assert sum(encoded) == 2 * len(first)  # the plain run and the cold cached run encode every image
    # Another attack on another model sharing the VAE encoder (here: the same model) encodes nothing.
    secmi, _ = run_attack(attack_secmi, common_argv(tiny_victim, tmp_path / "secmi", "--t_sec", 20, "--k", 10, *cache))
    second, _ = run_attack(attack_pia, common_argv(tiny_victim, tmp_path / "second", *one_t, *cache))
    assert sum(encoded) == 2 * len(first)
    assert uncached["score"] == first["score"] == second["score"]
    # A different VAE encoder (e.g. DreamBooth with --trainable_modules vae_encoder) misses the cache.
    changed = tmp_path / "changed_vae"
    shutil.copytree(tiny_victim / "pipeline", changed)
    vae = AutoencoderKL.from_pretrained(str(changed / "vae"))
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.01)
    vae.save_pretrained(str(changed / "vae"))
    run_attack(attack_pia, common_argv(tiny_victim, tmp_path / "changed", *one_t, *cache,
                                       "--pretrained_model_name_or_path", changed))
    assert sum(encoded) == 3 * len(first)


# ----------------------------------------------------------------------------------------------
# SecMI-NN: separate train / validation / test splits
# ----------------------------------------------------------------------------------------------

def test_secmi_nn_scores_only_the_test_split_and_picks_its_epoch_on_validation(tiny_victim, tmp_path, monkeypatch):
    import sklearn.metrics

    validation_sizes, roc_auc_score = [], sklearn.metrics.roc_auc_score
    monkeypatch.setattr(sklearn.metrics, "roc_auc_score",
                        lambda y, s: validation_sizes.append(len(y)) or roc_auc_score(y, s))
    flags = ["--t_sec", 20, "--k", 10, "--batch_size", 32, "--seed", 5]
    plain, _ = run_attack(attack_secmi, common_argv(tiny_victim, tmp_path / "plain", *flags))
    nn, _ = run_attack(attack_secmi, common_argv(tiny_victim, tmp_path / "nn", *flags, "--secmi_nn", "--nn_epochs", 3))
    splits = attack_secmi.nn_splits(np.asarray(plain["is_member"]), 0.5, 0.1, seed=5)
    assert sorted(map(len, splits.values())) == sorted([len(splits["train"]), len(splits["val"]), len(splits["test"])])
    assert not set(splits["train"]) & set(splits["val"]) and not set(splits["test"]) & (
        set(splits["train"]) | set(splits["val"]))
    assert sorted(nn["id"]) == sorted(plain.select(splits["test"])["id"])
    assert validation_sizes == [len(splits["val"])] * 3  # one validation AUC per epoch, never on the test rows
    plain_by_id = dict(zip(plain["id"], plain["score"]))
    assert [plain_by_id[i] for i in nn["id"]] == nn["score_t_error"]
    info = json.loads(nn.info.description)
    assert info["attack"] == "secmi_nn" and info["nn"]["test"] == len(nn)


def test_secmi_nn_network_learns_error_maps_that_separate_members():
    """On synthetic maps where members' errors are smaller, the test-split AUC of the network is high."""
    from types import SimpleNamespace

    generator = torch.Generator().manual_seed(0)
    n, shape = 200, (4, 8, 8)
    is_member = torch.arange(n) % 2 == 0
    maps = torch.rand(n, *shape, generator=generator) * torch.where(is_member, 0.7, 1.0)[:, None, None, None]
    dataset = datasets.Dataset.from_dict({
        "id": [f"img-{i}" for i in range(n)], "domain": ["d"] * n, "is_member": is_member.tolist(),
        "score": maps.flatten(1).pow(2).sum(1).double().tolist(), "error_map": list(maps.flatten(1).numpy())})
    args = SimpleNamespace(nn_train_fraction=0.5, nn_val_fraction=0.1, nn_epochs=20, seed=0, batch_size=32)
    test, record = attack_secmi.secmi_nn_scores(dataset, shape, args)
    auc = members_lower_auc(test)
    print(f"\nSecMI-NN on synthetic maps: test AUC {auc:.3f}, validation AUC {record['val_auc']:.3f}")
    assert len(test) == record["test"] == 80 and auc > 0.9
