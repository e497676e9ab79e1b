"""Seeds derived from a base seed and integer keys, so that no result depends on process count or row order.

`derive_seed(seed, *keys)` is the only seed formula of the project. When two uses of the same keys must draw
independent streams, a named salt is appended to the keys; the salts below are those integers.
"""

import numpy as np

SALT_PROMPT_TEMPLATE = 7        # generate_synthetic / the victim's captions: which template image i gets
SALT_GENERATION = 11            # evaluate.py: the sampler seed of generation i of (domain, template)
SALT_MIX_TIES = 0               # Mixup-I: the order in which domains receive a rounded-up image
SALT_MIX_SELECTION = 1          # Mixup-I: the permutation that picks a domain's perturbed images
SALT_ATTACK_NOISE = 13          # attacks: the Gaussian noise ε of draw j at timestep t
SALT_ATTACK_CALIBRATION = 17    # attacks that fit on labelled rows (CLiD, SimA's t): which rows calibrate
SALT_CAPTION = 19               # training: which caption (of a list, or of textual inversion's templates) item i gets
SALT_SURROGATE_LORA = 23        # Anti-DreamBooth --surrogate lora: the adapters' initial weights (every group's)
# Training crops: instance image i uses key i, its paired class image key CLASS_IMAGE_KEY_OFFSET + i, so the
# two never share a crop/flip stream (no dataset holds 10⁹ images).
CLASS_IMAGE_KEY_OFFSET = 10**9


def derive_seed(base_seed, *keys):
    """A 63-bit seed from `base_seed` and integer keys: numpy's SeedSequence([base_seed, *keys]).

    seed = (s₀ << 31) ^ s₁ masked to 63 bits, with (s₀, s₁) = SeedSequence(...).generate_state(2, uint32).
    """
    state = np.random.SeedSequence([int(base_seed)] + [int(key) for key in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)
