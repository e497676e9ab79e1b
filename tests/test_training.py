"""What the three training scripts share (training.py, training_data.py, dreambooth.py), tested without a model:
the DreamBooth loss and Min-SNR weights against float64, the step plan, the learning-rate scaling, the resume
signature and the seeded data order.
"""

from argparse import Namespace

import numpy as np
import pytest
import torch

from mixsyn_utils.dreambooth import dreambooth_loss, min_snr_weights
from mixsyn_utils.training import plan_steps, scaled_learning_rate, training_signature
from mixsyn_utils.training_data import EpochBatchSampler


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
    whole.set_epoch(1, skip_batches=3)
    assert list(whole) == [order[6:8], order[8:10]]
    whole.set_epoch(2)
    assert [i for batch in whole for i in batch] != order


def test_plan_steps_returns_the_upstream_rule_without_touching_args():
    args = Namespace(gradient_accumulation_steps=2, max_train_steps=None, num_train_epochs=3)
    plan = plan_steps(args, batches_per_epoch=7)
    assert (plan.updates_per_epoch, plan.max_train_steps, plan.num_train_epochs) == (4, 12, 3)
    assert args == Namespace(gradient_accumulation_steps=2, max_train_steps=None, num_train_epochs=3)
    capped = plan_steps(Namespace(gradient_accumulation_steps=1, max_train_steps=10, num_train_epochs=1), 4)
    assert (capped.max_train_steps, capped.num_train_epochs) == (10, 3)


def test_scale_lr_multiplies_by_accumulation_batch_and_processes():
    args = Namespace(learning_rate=1e-4, scale_lr=True, gradient_accumulation_steps=2, train_batch_size=4)
    assert scaled_learning_rate(args, num_processes=3) == pytest.approx(1e-4 * 24)
    assert args.learning_rate == 1e-4
    assert scaled_learning_rate(Namespace(learning_rate=1e-4, scale_lr=False), 3) == 1e-4


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
