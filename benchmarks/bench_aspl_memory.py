#!/usr/bin/env python
"""Peak GPU memory of Anti-DreamBooth ASPL (perturb_antidreambooth.py), full vs LoRA surrogate: SD-1.4 at 512 px and
SDXL at 1024 px. No GPU here: everything is counted on the CPU, on PyTorch's `meta` device (shapes, no values).
Also the FLOPs of one UNet forward at each model's resolution (`unet_forward_tflops`), the cost ratio that
run_experiment.py's --dry_run estimate applies to an SDXL study.

Measured (exactly, for the graph as PyTorch builds it):
- parameter counts of the real component configs (SD-1.4: UNet, CLIP ViT-L/14, VAE; SDXL base 1.0: UNet,
  CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 with projection; LoRA r 4 on the UNet's and text encoders' attention
  projections, peft);
- the bytes autograd saves for backward during one forward at full resolution (a `saved_tensors_hooks` tracer,
  deduplicated by storage, parameters excluded, bf16 as under `--mixed_precision bf16`), per phase: the surrogate's
  DreamBooth step (text encoder(s) + UNet, 1 instance + 1 class image) and the PGD step (VAE encoder + text
  encoder(s) + UNet, the pixels requiring grad). Attention is traced as a memory-efficient kernel saves it (q, k, v,
  output, an fp32 log-sum-exp; PyTorch SDPA / xformers), never the N × N matrix.
Computed per component from those counts (GB = 10⁹ bytes):
- weights, gradients and AdamW states = parameters × bytes of their dtype (AdamW: 2 states);
- activations with gradient checkpointing = saved outside the checkpointed blocks + the blocks' inputs + the largest
  block's own saved bytes (the one block recomputed at a time; diffusers checkpoints every ResnetBlock2D and
  BasicTransformerBlock, transformers every CLIPEncoderLayer, the VAE encoder per down block and mid block);
- peak = max(surrogate step, PGD step) + 1 GB assumed for the CUDA context and kernels' workspaces. Not counted:
  the allocator's fragmentation and the recomputation's transient tensors (a CPU cross-check measured 1.5–2.7× the
  traced activation bytes at the peak), so read a row as its activations' order of magnitude, not a promise.

Rows: the reference `aspl.py` as published (bf16 weights, grads and AdamW, 3 model copies while f′ trains, the PGD
batch of 4 images, parameters left trainable in PGD, no checkpointing); this repo's `--surrogate full` (fp32 master
weights under bf16 autocast, 3 copies: the base, f and f′; AdamW fp32; `--gradient_checkpointing --pgd_batch_size 1`);
this repo's `--surrogate lora` (one bf16 base, fp32 LoRA and AdamW, `--gradient_checkpointing --pgd_batch_size 1`,
the VAE in bf16).

    python benchmarks/bench_aspl_memory.py   # writes benchmarks/results/aspl_memory.{json,txt}
"""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixsyn_utils.lora import TEXT_ENCODER_LORA_TARGETS, UNET_LORA_TARGETS  # noqa: E402

GB = 1e9
CUDA_CONTEXT_GB = 1.0  # assumed, not measurable without a GPU
RESULTS = Path(__file__).resolve().parent / "results"

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              layers_per_block=2, norm_num_groups=32)
SD14_UNET = dict(sample_size=64, layers_per_block=2, attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                 cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_UNET = dict(sample_size=128, layers_per_block=2, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                 cross_attention_dim=2048, use_linear_projection=True, transformer_layers_per_block=[1, 2, 10],
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
MODELS = {"SD-1.4 @ 512 px": dict(unet=SD14_UNET, text_encoders=[CLIP_L], resolution=512),
          "SDXL @ 1024 px": dict(unet=SDXL_UNET, text_encoders=[CLIP_L, CLIP_BIG_G], resolution=1024)}


class SavedBytes:
    """Storages autograd saves during a forward (parameters excluded), attributed to the checkpointed block running."""

    def __init__(self, models, block_types):
        self.parameters = {p.untyped_storage()._cdata for model in models for p in model.parameters()}
        self.saved, self.inputs, self.running, self.blocks, self.handles = {}, {}, [], 0, []
        for model in models:
            for module in model.modules():
                if isinstance(module, block_types):
                    self.handles += [module.register_forward_pre_hook(self._enter, with_kwargs=True),
                                     module.register_forward_hook(self._leave)]

    def _enter(self, module, args, kwargs):
        if not self.running:  # a block's inputs stay alive under checkpointing
            for value in (*args, *kwargs.values()):
                if torch.is_tensor(value) and value.requires_grad:
                    self.inputs[value.untyped_storage()._cdata] = value.untyped_storage().nbytes()
        self.running.append(self.blocks)
        self.blocks += 1

    def _leave(self, module, args, output):
        self.running.pop()  # returns None: a forward hook's return value would replace the output

    def _pack(self, tensor):
        storage = tensor.untyped_storage()._cdata
        if storage not in self.parameters and storage not in self.saved:
            self.saved[storage] = (tensor.untyped_storage().nbytes(), self.running[0] if self.running else None)
        return tensor

    @contextlib.contextmanager
    def tracing(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield

    def gigabytes(self):
        """(saved without checkpointing, saved with checkpointing) in GB."""
        for handle in self.handles:
            handle.remove()
        per_block = {}
        for size, block in self.saved.values():
            per_block[block] = per_block.get(block, 0) + size
        outside = per_block.pop(None, 0)
        inputs = sum(size for storage, size in self.inputs.items() if self.saved.get(storage, (0, 0))[1] is not None
                     or storage not in self.saved)
        return sum(size for size, _ in self.saved.values()) / GB, (outside + inputs + max(per_block.values(),
                                                                                          default=0)) / GB


@contextlib.contextmanager
def memory_efficient_attention():
    """SDPA traced as flash / memory-efficient kernels save it: q, k, v, output and an fp32 log-sum-exp."""
    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
            return out

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: Attention.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def build(spec, dtype=torch.bfloat16):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"]).to(dtype)
        vae = AutoencoderKL(**SD_VAE).to(dtype)
        classes = [CLIPTextModel, CLIPTextModelWithProjection][:len(spec["text_encoders"])]
        encoders = [cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config)).to(dtype)
                    for cls, config in zip(classes, spec["text_encoders"])]
    return unet, vae, encoders


def parameters(module, trainable=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def add_lora(unet, encoders, rank=4):
    from peft import LoraConfig

    for model in (unet, *encoders):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_LORA_TARGETS))
    for encoder in encoders:
        encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_ENCODER_LORA_TARGETS))


def trace_step(spec, mode, batch, with_vae):
    """(saved GB without, with checkpointing) of one forward: text encoder(s) + UNet, after the VAE encoder when
    `with_vae` (PGD: the pixels require grad). mode: "full" (UNet and text encoders trainable), "lora", "frozen"."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    unet, vae, encoders = build(spec)
    vae.requires_grad_(False)
    if mode == "lora":
        add_lora(unet, encoders)
    elif mode == "frozen":
        for model in (unet, *encoders):
            model.requires_grad_(False)
    blocks = (ResnetBlock2D, BasicTransformerBlock, CLIPEncoderLayer)
    tracer = SavedBytes([unet, *encoders], blocks)
    vae_tracer = SavedBytes([vae], (DownEncoderBlock2D, UNetMidBlock2D))
    resolution, dtype = spec["resolution"], torch.bfloat16
    with torch.device("meta"), memory_efficient_attention():
        if with_vae:
            with vae_tracer.tracing():
                pixels = torch.empty(batch, 3, resolution, resolution, dtype=dtype, requires_grad=True)
                latents = vae.encode(pixels).latent_dist.sample()
        else:
            latents = torch.empty(batch, 4, resolution // 8, resolution // 8, dtype=dtype)
        with tracer.tracing():
            ids = torch.zeros(batch, 77, dtype=torch.long)
            outputs = [encoder(ids, output_hidden_states=True) for encoder in encoders]
            if len(encoders) == 2:
                context = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
                added = {"text_embeds": outputs[1].text_embeds, "time_ids": torch.zeros(batch, 6, dtype=dtype)}
            else:
                context, added = outputs[0].last_hidden_state, None
            unet(latents, torch.zeros(batch, dtype=torch.long), context, added_cond_kwargs=added)
    unet_gb, vae_gb = tracer.gigabytes(), vae_tracer.gigabytes() if with_vae else (0.0, 0.0)
    return {"unet_and_text_encoders": unet_gb, "vae_encoder": vae_gb}


def component_counts(spec):
    unet, vae, encoders = build(spec)
    counts = {"unet": parameters(unet), "text_encoders": [parameters(e) for e in encoders], "vae": parameters(vae)}
    add_lora(unet, encoders)
    counts["lora_unet"] = parameters(unet, trainable=True)
    counts["lora_text_encoders"] = [parameters(e, trainable=True) for e in encoders]
    return counts


def scenario_rows(name, spec):
    counts = component_counts(spec)
    model = counts["unet"] + sum(counts["text_encoders"])  # what a full surrogate trains (with the text encoders)
    lora = counts["lora_unet"] + sum(counts["lora_text_encoders"])
    vae_gb = counts["vae"] * 2 / GB  # bf16
    traces = {
        "reference": {"surrogate": trace_step(spec, "full", 2, False), "pgd": trace_step(spec, "full", 4, True)},
        "full": {"surrogate": trace_step(spec, "full", 2, False), "pgd": trace_step(spec, "frozen", 1, True)},
        "lora": {"surrogate": trace_step(spec, "lora", 2, False), "pgd": trace_step(spec, "frozen", 1, True)},
    }
    rows = []
    for scenario, label, weights, trained, state_bytes, checkpointing, pgd_param_grads in (
            ("reference", "reference aspl.py (bf16 states, 3 copies, PGD batch 4, no checkpointing)",
             3 * model * 2, model, 2, False, model * 2),
            ("full", "this repo --surrogate full (fp32 master weights, 3 copies, checkpointing, PGD batch 1)",
             3 * model * 4 + model * 2, model, 4, True, 0),  # + autocast's bf16 copy of the weights in training
            ("lora", "this repo --surrogate lora (bf16 base, fp32 LoRA, checkpointing, PGD batch 1)",
             model * 2 + lora * 4, lora, 4, True, 0)):
        index = 1 if checkpointing else 0
        surrogate_act = traces[scenario]["surrogate"]["unet_and_text_encoders"][index]
        pgd_act = (traces[scenario]["pgd"]["unet_and_text_encoders"][index]
                   + traces[scenario]["pgd"]["vae_encoder"][index])
        grads, adam = trained * state_bytes / GB, 2 * trained * state_bytes / GB
        surrogate_gb = weights / GB + vae_gb + grads + adam + surrogate_act
        pgd_gb = weights / GB + vae_gb + pgd_param_grads / GB + pgd_act
        rows.append({"model": name, "scenario": label, "weights_GB": weights / GB, "vae_GB": vae_gb,
                     "trained_parameters": trained, "grads_GB": grads, "adamw_GB": adam,
                     "surrogate_activations_GB": surrogate_act, "pgd_activations_GB": pgd_act,
                     "pgd_parameter_grads_GB": pgd_param_grads / GB, "surrogate_step_GB": surrogate_gb,
                     "pgd_step_GB": pgd_gb, "peak_GB": max(surrogate_gb, pgd_gb) + CUDA_CONTEXT_GB})
    return counts, traces, rows


def unet_forward_tflops(spec):
    """FLOPs of one UNet forward of one image at the model's resolution, 77 caption tokens (torch.utils.flop_counter:
    matmuls, convolutions and attention, 2 FLOPs per multiply-add), counted on the meta device, in TFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, _, encoders = build(spec, torch.float32)
    latent = spec["resolution"] // 8
    with torch.device("meta"):
        context = torch.empty(1, 77, unet.config.cross_attention_dim)
        added = ({"text_embeds": torch.empty(1, encoders[-1].config.projection_dim), "time_ids": torch.empty(1, 6)}
                 if unet.config.addition_embed_type == "text_time" else None)
        with FlopCounterMode(display=False) as counter:
            unet(torch.empty(1, 4, latent, latent), torch.tensor([500]), context, added_cond_kwargs=added)
    return counter.get_total_flops() / 1e12


def main():
    report = {"what": __doc__.split("\n\n")[1], "cuda_context_GB_assumed": CUDA_CONTEXT_GB, "models": {}, "rows": []}
    for name, spec in MODELS.items():
        counts, traces, rows = scenario_rows(name, spec)
        report["models"][name] = {"parameters": counts, "traced_saved_GB_[no_checkpointing,checkpointing]": traces,
                                  "unet_forward_TFLOP": unet_forward_tflops(spec)}
        report["rows"] += rows
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "aspl_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    columns = ["model", "scenario", "weights_GB", "grads_GB", "adamw_GB", "surrogate_activations_GB",
               "pgd_activations_GB", "surrogate_step_GB", "pgd_step_GB", "peak_GB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |"
              for row in report["rows"]]
    tflops = {name: model["unet_forward_TFLOP"] for name, model in report["models"].items()}
    lines += ["", "UNet forward, one image: " + ", ".join(f"{name} {value:.2f} TFLOP" for name, value in tflops.items())
              + f" (ratio {tflops['SDXL @ 1024 px'] / tflops['SD-1.4 @ 512 px']:.2f}; run_experiment.py's "
              "UNET_COST_RATIO)"]
    (RESULTS / "aspl_memory.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
