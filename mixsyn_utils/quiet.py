"""Library console messages that carry nothing for a user of these scripts, silenced where they are emitted.

Every script imports this module first. What our own calls caused is fixed in our code instead (pipelines get
`dtype=`, not the deprecated `torch_dtype=`; a UNet-only LoRA is loaded into the UNet alone; LoRA weights are
saved without peft's embedding-layer guess). Each filter below names its source and why it stays.
"""

import logging

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message contains `fragment`; every other record passes."""

    def __init__(self, fragment):
        super().__init__()
        self.fragment = fragment

    def filter(self, record):
        return self.fragment not in record.getMessage()


# bitsandbytes looks for an optional `kernels` package when it is imported (on CPUs with AVX512-BF16) and warns when
# it is missing. diffusers and peft import bitsandbytes whenever it is installed, so every script would print it,
# though only --use_8bit_adam uses bitsandbytes, and never its CPU 4-bit kernels.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# diffusers' ModelMixin.to warns on every cast to a half dtype that modules "should be kept in float32", even when
# the model has none (it tests a list it has just made from None against None); a real list still shows.
logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropMessage("should be kept in float32: []"))
# diffusers' load_textual_inversion resizes the text encoder's embeddings without `mean_resizing=False`, so
# transformers explains how it would initialise rows that the loader overwrites right after.
logging.getLogger("transformers.modeling_utils").addFilter(_DropMessage("new embeddings will be initialized"))
# accelerate logs each file of every checkpoint at INFO level; the training loop reports the checkpoint itself.
logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)
# Loading a pipeline or a model draws a progress bar per call (validation loads one at every validation) that
# finishes in well under a minute; the scripts show their own bars for their long loops.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()
