"""What the three training scripts share (training.py, checkpoints.py, training_data.py, dreambooth.py), tested
without a model: the DreamBooth loss and Min-SNR weights against float64, the resume signature and the seeded
data order.
"""

import shutil
from argparse import Namespace

import numpy as np
import pytest
import torch

from mixsyn_utils.dreambooth import dreambooth_loss, min_snr_weights
from mixsyn_utils.checkpoints import training_signature as signature_of_flags
from mixsyn_utils.flags import flag_values
from mixsyn_utils.training_data import EpochBatchSampler


def training_signature(args, inputs=None):
    return signature_of_flags(flag_values(args), inputs)


def test_dreambooth_loss_weights_prior_rows_by_lambda():
    from types import SimpleNamespace

    rng = np.random.default_rng(1)
    prediction, target = rng.normal(size=(5, 4, 2, 2)), rng.normal(size=(5, 4, 2, 2))
    instance = ((prediction[:2] - target[:2]) ** 2).mean()
    prior = ((prediction[2:] - target[2:]) ** 2).mean()
    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="epsilon"))
    loss, instance_loss, prior_loss = dreambooth_loss(torch.from_numpy(prediction), torch.from_numpy(target),
                                                      torch.zeros(5, dtype=torch.long), scheduler, 2, 0.5)
    assert instance_loss.item() == pytest.approx(instance, rel=1e-6)
    assert prior_loss.item() == pytest.approx(prior, rel=1e-6)
    assert loss.item() == pytest.approx(instance + 0.5 * prior, rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_float64_reference(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 300, 999])
    alpha_bar = scheduler.alphas_cumprod.numpy().astype(np.float64)[timesteps.numpy()]  # the model's own ᾱ_t
    snr = alpha_bar / (1 - alpha_bar)
    reference = np.minimum(snr, 5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    np.testing.assert_allclose(min_snr_weights(scheduler, timesteps, 5.0).numpy(), reference, rtol=1e-5)


def test_data_order_depends_only_on_seed_and_epoch_and_processes_split_it():
    whole = EpochBatchSampler(10, 2, seed=3)
    whole.set_epoch(1)
    halves = [EpochBatchSampler(10, 2, seed=3, process_index=p, num_processes=2) for p in (0, 1)]
    for sampler in halves:
        sampler.set_epoch(1)
    order = [i for batch in whole for i in batch]
    assert sorted(order) == list(range(10))
    assert [i for batch in halves[0] for i in batch] == order[0::2]
    assert [i for batch in halves[1] for i in batch] == order[1::2]
    whole.resume_at(1, 3)
    whole.set_epoch(1)
    assert list(whole) == [order[6:8], order[8:10]]
    whole.set_epoch(2)
    assert [i for batch in whole for i in batch] != order
    whole.set_epoch(1)  # the resume skip applies to its epoch only
    assert len(list(whole)) == 2


def test_training_signature_ignores_output_flags_and_length_only_for_length_free_schedules():
    def args(**changes):
        flags = dict(learning_rate=1e-4, lr_scheduler="constant", max_train_steps=4, num_train_epochs=1,
                     output_dir="a", checkpointing_steps=2, hub_token="secret", seed=0)
        flags.update(changes)
        return Namespace(**flags)

    reference = training_signature(args())
    assert training_signature(args(output_dir="b", checkpointing_steps=5)) == reference
    assert training_signature(args(max_train_steps=8)) == reference  # a constant schedule may train longer
    assert training_signature(args(learning_rate=1e-3)) != reference
    linear = training_signature(args(lr_scheduler="linear"))
    assert training_signature(args(lr_scheduler="linear", max_train_steps=8)) != linear
    assert "secret" not in str(reference)


# ----------------------------------------------------------------------------------------------
# Output folder, resume and run signature (hostile reruns), without a model
# ----------------------------------------------------------------------------------------------

def output_args(output_dir, **changes):
    flags = dict(output_dir=str(output_dir), overwrite=False, resume_from_checkpoint=None, save_mixed_dataset=None,
                 logging_dir="logs")
    flags.update(changes)
    return Namespace(**flags)


def occupied(folder, *names):
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).mkdir()
    return folder


def test_an_occupied_output_dir_is_refused_unless_overwrite_or_resume(tmp_path):
    from mixsyn_utils.cli import InputError
    from mixsyn_utils.training_flags import check_training_outputs

    out = occupied(tmp_path / "out", "checkpoint-2")
    with pytest.raises(InputError, match="--output_dir .* is not empty .*--overwrite.*--resume_from_checkpoint"):
        check_training_outputs(output_args(out))
    check_training_outputs(output_args(out, overwrite=True))
    check_training_outputs(output_args(out, resume_from_checkpoint="latest"))
    with pytest.raises(InputError, match="not both"):
        check_training_outputs(output_args(out, overwrite=True, resume_from_checkpoint="latest"))


def test_an_output_dir_that_is_a_file_is_refused_even_with_overwrite(tmp_path):
    from mixsyn_utils.cli import InputError
    from mixsyn_utils.training_flags import check_training_outputs

    (tmp_path / "out").write_text("a file")
    with pytest.raises(InputError, match="exists and is a file"):
        check_training_outputs(output_args(tmp_path / "out", overwrite=True))


def test_an_existing_save_mixed_dataset_is_refused_without_overwrite(tmp_path):
    from mixsyn_utils.cli import InputError
    from mixsyn_utils.training_flags import check_training_outputs

    mixed = occupied(tmp_path / "mixed", "data")
    with pytest.raises(InputError, match="--save_mixed_dataset .* exists and is not empty"):
        check_training_outputs(output_args(tmp_path / "out", save_mixed_dataset=str(mixed)))
    check_training_outputs(output_args(tmp_path / "out", save_mixed_dataset=str(mixed), overwrite=True))


class MainProcess:
    """What the output-folder helpers use of an `Accelerator`, for one process."""

    is_main_process, process_index = True, 0

    def wait_for_everyone(self):
        pass


def test_overwrite_removes_the_old_runs_checkpoints_before_training(tmp_path):
    from mixsyn_utils.checkpoints import list_checkpoints
    from mixsyn_utils.training import start_output_dir

    out = occupied(tmp_path / "out", "checkpoint-1", "checkpoint-2")
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"old weights")
    start_output_dir(MainProcess(), out, overwrite=True)
    assert out.is_dir() and not any(out.iterdir()) and list_checkpoints(out) == []


@pytest.mark.parametrize("left_behind, removed", [(["logs", ".checkpoint-1.incomplete"], True),
                                                  (["logs", "checkpoint-1"], False),
                                                  (["logs", "user_notes"], False)])
def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(tmp_path, left_behind, removed):
    from mixsyn_utils.checkpoints import removed_if_nothing_finished

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with removed_if_nothing_finished(MainProcess(), out, "logs"):
            occupied(out, *left_behind)
            raise RuntimeError("out of memory at step 1")
    assert out.exists() != removed


def fake_checkpoint(folder, signature, random_states=None):
    import json

    folder.mkdir(parents=True)
    (folder / "training_state.json").write_text(json.dumps({"global_step": 2, "signature": signature}))
    if random_states is not None:
        (folder / "random_states_0.pkl").write_bytes(random_states)
    return folder


def lora_flags(**changes):
    flags = dict(learning_rate=5e-4, lr_scheduler="constant", max_train_steps=4, num_train_epochs=1, seed=0,
                 output_dir="out")
    flags.update(changes)
    return Namespace(**flags)


def test_resume_with_another_learning_rate_is_refused_naming_it(tmp_path):
    from mixsyn_utils.cli import InputError
    from mixsyn_utils.checkpoints import check_resume

    checkpoint = fake_checkpoint(tmp_path / "checkpoint-2", training_signature(lora_flags()))
    with pytest.raises(InputError, match=r"made with other --learning_rate; resume with the same flags"):
        check_resume(checkpoint, training_signature(lora_flags(learning_rate=1e-1)), num_processes=1)


def test_resume_with_unreadable_random_states_is_refused(tmp_path):
    from mixsyn_utils.cli import InputError
    from mixsyn_utils.checkpoints import check_resume

    signature = training_signature(lora_flags())
    checkpoint = fake_checkpoint(tmp_path / "checkpoint-2", signature, random_states=b"not a checkpoint")
    with pytest.raises(InputError, match=r"checkpoint-2: random_states_0.pkl cannot be read"):
        check_resume(checkpoint, signature, num_processes=1)


def test_resume_after_the_training_set_was_replaced_is_refused(tmp_path):
    import datasets
    from PIL import Image

    from mixsyn_utils.cli import InputError
    from mixsyn_utils.checkpoints import check_resume
    from mixsyn_utils.training_data import load_training_images

    def save_set(color):
        rows = {"id": ["a", "b"], "image": [Image.new("RGB", (8, 8), color)] * 2, "prompt": ["The face of one"] * 2}
        datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "synthetic"))

    import argparse

    from mixsyn_utils.training_flags import add_training_args

    args = add_training_args(argparse.ArgumentParser()).parse_args([
        "--pretrained_model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "synthetic"),
        "--caption_column", "prompt", "--output_dir", "out", "--max_train_steps", "4", "--learning_rate", "5e-4",
        "--seed", "0"])
    def inputs():
        return load_training_images(args.dataset_name, caption_column=args.caption_column, seed=args.seed).fingerprints

    save_set((10, 20, 30))
    signature = training_signature(args, inputs())
    checkpoint = fake_checkpoint(tmp_path / "checkpoint-2", signature)
    shutil.rmtree(tmp_path / "synthetic")
    save_set((200, 20, 30))
    replaced = training_signature(args, inputs())
    with pytest.raises(InputError, match=r"made with other dataset_name; resume with the same flags and inputs"):
        check_resume(checkpoint, replaced, num_processes=1)
