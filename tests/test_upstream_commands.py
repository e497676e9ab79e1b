"""The diffusers examples' README and docs commands, with only the script name changed, parse in our scripts.

Each command is the upstream one (examples/dreambooth/README.md, examples/text_to_image/README.md,
examples/textual_inversion/README.md, docs/source/en/training/*.md) after `accelerate launch [launcher flags]`,
with its shell variables filled in. Parsing runs our flag checks too, so the image folders they name must exist.
"""

import importlib
import shlex

import pytest

DREAMBOOTH, LORA, TEXTUAL_INVERSION = "train_dreambooth_mixsyn", "train_lora_mixsyn", "train_textual_inversion_mixsyn"
SD14, SD15 = "CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-5/stable-diffusion-v1-5"
PRIOR = ("--class_data_dir=path-to-class-images --output_dir=path-to-save-model --with_prior_preservation "
         "--prior_loss_weight=1.0 '--instance_prompt=a photo of sks dog' '--class_prompt=a photo of dog' "
         "--resolution=512 --train_batch_size=1")
IF_TEXT = "--pre_compute_text_embeddings --tokenizer_max_length=77 --text_encoder_use_attention_mask"
IF_IMAGES = "--validation_images " + " ".join(f"dog_downsized/image_{i}.png" for i in range(1, 5))
TEXTUAL_INVERSION_CAT = (f"--pretrained_model_name_or_path={SD15} --train_data_dir=./cat --learnable_property=object "
                         "'--placeholder_token=<cat-toy>' --initializer_token=toy --resolution=512 --train_batch_size=1 "
                         "--gradient_accumulation_steps=4 --max_train_steps=3000 --learning_rate=5.0e-04 --scale_lr "
                         "--lr_scheduler=constant --lr_warmup_steps=0")

UPSTREAM_COMMANDS = [
    ("dreambooth/README.md:76", DREAMBOOTH,
     f"--pretrained_model_name_or_path={SD14} --instance_data_dir=dog --output_dir=path-to-save-model "
     "'--instance_prompt=a photo of sks dog' --resolution=512 --train_batch_size=1 --gradient_accumulation_steps=1 "
     "--learning_rate=5e-6 --lr_scheduler=constant --lr_warmup_steps=0 --max_train_steps=400 --push_to_hub"),
    ("dreambooth/README.md:102", DREAMBOOTH,
     f"--pretrained_model_name_or_path={SD14} --instance_data_dir=dog {PRIOR} --gradient_accumulation_steps=1 "
     "--learning_rate=5e-6 --lr_scheduler=constant --lr_warmup_steps=0 --num_class_images=200 --max_train_steps=800 "
     "--push_to_hub"),
    ("dreambooth/README.md:134", DREAMBOOTH,
     f"--pretrained_model_name_or_path={SD14} --instance_data_dir=dog {PRIOR} --gradient_accumulation_steps=2 "
     "--gradient_checkpointing --use_8bit_adam --learning_rate=5e-6 --lr_scheduler=constant --lr_warmup_steps=0 "
     "--num_class_images=200 --max_train_steps=800 --push_to_hub"),
    ("dreambooth/README.md:168", DREAMBOOTH,
     f"--pretrained_model_name_or_path={SD14} --instance_data_dir=dog {PRIOR} --gradient_accumulation_steps=1 "
     "--gradient_checkpointing --use_8bit_adam --enable_xformers_memory_efficient_attention --set_grads_to_none "
     "--learning_rate=2e-6 --lr_scheduler=constant --lr_warmup_steps=0 --num_class_images=200 --max_train_steps=800 "
     "--push_to_hub"),
    ("dreambooth/README.md:213", DREAMBOOTH,
     f"--pretrained_model_name_or_path={SD14} --instance_data_dir=dog {PRIOR} --sample_batch_size=1 "
     "--gradient_accumulation_steps=1 --gradient_checkpointing --learning_rate=5e-6 --lr_scheduler=constant "
     "--lr_warmup_steps=0 --num_class_images=200 --max_train_steps=800 --push_to_hub"),
    ("dreambooth/README.md:246", DREAMBOOTH,
     f"--pretrained_model_name_or_path={SD14} --train_text_encoder --instance_data_dir=dog {PRIOR} --use_8bit_adam "
     "--gradient_checkpointing --learning_rate=2e-6 --lr_scheduler=constant --lr_warmup_steps=0 "
     "--num_class_images=200 --max_train_steps=800 --push_to_hub"),
    ("dreambooth/README.md:340", LORA,
     f"--pretrained_model_name_or_path={SD15} --instance_data_dir=dog --output_dir=path-to-save-model "
     "'--instance_prompt=a photo of sks dog' --resolution=512 --train_batch_size=1 --gradient_accumulation_steps=1 "
     "--checkpointing_steps=100 --learning_rate=1e-4 --report_to=wandb --lr_scheduler=constant --lr_warmup_steps=0 "
     "--max_train_steps=500 '--validation_prompt=A photo of sks dog in a bucket' --validation_epochs=50 --seed=0 "
     "--push_to_hub"),
    ("dreambooth/README.md:609", LORA,
     "--report_to wandb --pretrained_model_name_or_path=DeepFloyd/IF-I-XL-v1.0 --instance_data_dir=dog "
     "--output_dir=dreambooth_dog_lora '--instance_prompt=a sks dog' --resolution=64 --train_batch_size=4 "
     "--gradient_accumulation_steps=1 --learning_rate=5e-6 --scale_lr --max_train_steps=1200 "
     f"'--validation_prompt=a sks dog' --validation_epochs=25 --checkpointing_steps=100 {IF_TEXT}"),
    ("dreambooth/README.md:645", LORA,
     "--report_to wandb --pretrained_model_name_or_path=DeepFloyd/IF-II-L-v1.0 --instance_data_dir=dog "
     "--output_dir=dreambooth_dog_upscale '--instance_prompt=a sks dog' --resolution=256 --train_batch_size=4 "
     "--gradient_accumulation_steps=1 --learning_rate=1e-6 --max_train_steps=2000 '--validation_prompt=a sks dog' "
     f"--validation_epochs=100 --checkpointing_steps=500 {IF_TEXT} {IF_IMAGES} --class_labels_conditioning=timesteps"),
    ("dreambooth/README.md:685", DREAMBOOTH,
     "--pretrained_model_name_or_path=DeepFloyd/IF-I-XL-v1.0 --instance_data_dir=dog --output_dir=dreambooth_if "
     "'--instance_prompt=a photo of sks dog' --resolution=64 --train_batch_size=4 --gradient_accumulation_steps=1 "
     "--learning_rate=1e-7 --max_train_steps=150 --validation_prompt 'a photo of sks dog' --validation_steps 25 "
     "--text_encoder_use_attention_mask --tokenizer_max_length 77 --pre_compute_text_embeddings --use_8bit_adam "
     "--set_grads_to_none --skip_save_text_encoder --validation_scheduler DDPMScheduler --push_to_hub"),
    ("dreambooth/README.md:723", DREAMBOOTH,
     "--report_to wandb --pretrained_model_name_or_path=DeepFloyd/IF-II-L-v1.0 --instance_data_dir=dog "
     "--output_dir=dreambooth_dog_upscale '--instance_prompt=a sks dog' --resolution=256 --train_batch_size=2 "
     "--gradient_accumulation_steps=6 --learning_rate=5e-6 --max_train_steps=2000 '--validation_prompt=a sks dog' "
     f"--validation_steps=150 --checkpointing_steps=500 {IF_TEXT} {IF_IMAGES} --class_labels_conditioning timesteps "
     "--validation_scheduler DDPMScheduler --push_to_hub"),
    ("text_to_image/README.md:224", LORA,
     f"--pretrained_model_name_or_path={SD14} --dataset_name=lambdalabs/naruto-blip-captions --caption_column=text "
     "--resolution=512 --random_flip --train_batch_size=1 --num_train_epochs=100 --checkpointing_steps=5000 "
     "--learning_rate=1e-04 --lr_scheduler=constant --lr_warmup_steps=0 --seed=42 --output_dir=sd-naruto-model-lora "
     "'--validation_prompt=cute dragon creature' --report_to=wandb"),
    ("textual_inversion/README.md:69", TEXTUAL_INVERSION,
     f"{TEXTUAL_INVERSION_CAT} --push_to_hub --output_dir=textual_inversion_cat"),
    ("docs/training/dreambooth.md:296", DREAMBOOTH,
     f"--pretrained_model_name_or_path={SD15} --instance_data_dir=./dog --output_dir=path_to_saved_model "
     "'--instance_prompt=a photo of sks dog' --resolution=512 --train_batch_size=1 --gradient_accumulation_steps=1 "
     "--learning_rate=5e-6 --lr_scheduler=constant --lr_warmup_steps=0 --max_train_steps=400 --push_to_hub"),
    ("docs/training/lora.md:163", LORA,
     f"--pretrained_model_name_or_path={SD15} --dataset_name=lambdalabs/naruto-blip-captions "
     "--dataloader_num_workers=8 --resolution=512 --center_crop --random_flip --train_batch_size=1 "
     "--gradient_accumulation_steps=4 --max_train_steps=15000 --learning_rate=1e-04 --max_grad_norm=1 "
     "--lr_scheduler=cosine --lr_warmup_steps=0 --output_dir=/sddata/finetune/lora/naruto --push_to_hub "
     "--hub_model_id=naruto-lora --report_to=wandb --checkpointing_steps=500 "
     "'--validation_prompt=A naruto with blue eyes.' --seed=1337"),
    ("docs/training/text_inversion.md:172", TEXTUAL_INVERSION,
     f"{TEXTUAL_INVERSION_CAT} --output_dir=textual_inversion_cat --push_to_hub"),
]


@pytest.fixture
def upstream_cwd(tmp_path, monkeypatch):
    """A working folder with the image folders the commands name (`dog/`, `cat/`), xformers reported installed."""
    from PIL import Image

    for folder in ("dog", "cat"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "0.png")
    monkeypatch.chdir(tmp_path)
    # One command asks for xformers attention, which this machine lacks; upstream needs it installed too.
    monkeypatch.setattr("diffusers.utils.import_utils.is_xformers_available", lambda: True)
    return tmp_path


def parse(script, command):
    return importlib.import_module(script).parse_args(shlex.split(command))


@pytest.mark.parametrize("source, script, command", UPSTREAM_COMMANDS, ids=[c[0] for c in UPSTREAM_COMMANDS])
def test_upstream_command_parses_with_only_the_script_name_changed(upstream_cwd, source, script, command):
    args = parse(script, command)
    if "--placeholder_token=<cat-toy>" in command:
        assert args.placeholder_token == "<cat-toy>"  # not taken as an abbreviation of --placeholder_token_template
    if "--validation_epochs" in command:
        assert args.validation_epochs is not None


def test_abbreviated_flags_are_refused(upstream_cwd, capsys):
    with pytest.raises(SystemExit):
        parse(TEXTUAL_INVERSION, f"{TEXTUAL_INVERSION_CAT} --placeholder_token_t=<{{domain}}>")
    assert "unrecognized arguments: --placeholder_token_t" in capsys.readouterr().err


def test_lora_defaults_follow_the_upstream_script_of_its_input(upstream_cwd):
    dreambooth_lora = parse(LORA, f"--pretrained_model_name_or_path={SD15} --instance_data_dir=dog --instance_prompt=x")
    text_to_image = parse(LORA, f"--pretrained_model_name_or_path={SD15} --dataset_name=lambdalabs/naruto-blip-captions")
    assert (dreambooth_lora.learning_rate, dreambooth_lora.train_batch_size, dreambooth_lora.num_train_epochs,
            dreambooth_lora.validation_epochs) == (5e-4, 4, 1, 50)
    assert (text_to_image.learning_rate, text_to_image.train_batch_size, text_to_image.num_train_epochs,
            text_to_image.validation_epochs, text_to_image.output_dir) == (1e-4, 16, 100, 1, "sd-model-finetuned-lora")


# The 6 commands of diffusers' three SDXL READMEs (examples/dreambooth/README_sdxl.md, examples/text_to_image/
# README_sdxl.md, examples/textual_inversion/README_sdxl.md), their shell variables filled in; C4's launcher flags
# (`--config_file`) precede the script and are not the script's. Upstream's SDXL docs pages launch none of them.
SDXL, SDXL_VAE, NARUTO = ("stabilityai/stable-diffusion-xl-base-1.0", "madebyollin/sdxl-vae-fp16-fix",
                          "lambdalabs/naruto-blip-captions")
SDXL_DREAMBOOTH_TAIL = ("--mixed_precision=fp16 '--instance_prompt=a photo of sks dog' --resolution=1024 "
                        "--train_batch_size=1 --gradient_accumulation_steps=4 --learning_rate=1e-4")
SDXL_DREAMBOOTH_END = ("--lr_scheduler=constant --lr_warmup_steps=0 --max_train_steps=500 "
                       "'--validation_prompt=A photo of sks dog in a bucket' --validation_epochs=25 --seed=0 --push_to_hub")
SDXL_COMMANDS = [
    ("dreambooth/README_sdxl.md:79", LORA,
     f"--pretrained_model_name_or_path={SDXL} --instance_data_dir=dog --pretrained_vae_model_name_or_path={SDXL_VAE} "
     f"--output_dir=lora-trained-xl {SDXL_DREAMBOOTH_TAIL} --report_to=wandb {SDXL_DREAMBOOTH_END}"),
    ("dreambooth/README_sdxl.md:223", LORA,
     "--pretrained_model_name_or_path=playgroundai/playground-v2.5-1024px-aesthetic --instance_data_dir=dog "
     f"--output_dir=dog-playground-lora {SDXL_DREAMBOOTH_TAIL} --use_8bit_adam --report_to=wandb {SDXL_DREAMBOOTH_END}"),
    ("text_to_image/README_sdxl.md:165", LORA,
     f"--pretrained_model_name_or_path={SDXL} --pretrained_vae_model_name_or_path={SDXL_VAE} --dataset_name={NARUTO} "
     "--caption_column=text --resolution=1024 --random_flip --train_batch_size=1 --num_train_epochs=2 "
     "--checkpointing_steps=500 --learning_rate=1e-04 --lr_scheduler=constant --lr_warmup_steps=0 "
     "--mixed_precision=fp16 --seed=42 --output_dir=sd-naruto-model-lora-sdxl '--validation_prompt=cute dragon creature' "
     "--report_to=wandb --push_to_hub"),
    ("text_to_image/README_sdxl.md:225", LORA,
     f"--pretrained_model_name_or_path={SDXL} --pretrained_vae_model_name_or_path={SDXL_VAE} --dataset_name={NARUTO} "
     "--caption_column=text --resolution=1024 --train_batch_size=1 --num_train_epochs=2 --checkpointing_steps=2 "
     "--learning_rate=1e-04 --lr_scheduler=constant --lr_warmup_steps=0 --mixed_precision=fp16 --max_train_steps=20 "
     "--validation_epochs=20 --seed=1234 --output_dir=sd-naruto-model-lora-sdxl '--validation_prompt=cute dragon creature'"),
    ("text_to_image/README_sdxl.md:254", LORA,
     f"--pretrained_model_name_or_path={SDXL} --dataset_name={NARUTO} --caption_column=text --resolution=1024 "
     "--random_flip --train_batch_size=1 --num_train_epochs=2 --checkpointing_steps=500 --learning_rate=1e-04 "
     "--lr_scheduler=constant --lr_warmup_steps=0 --seed=42 --output_dir=sd-naruto-model-lora-sdxl-txt "
     "--train_text_encoder '--validation_prompt=cute dragon creature' --report_to=wandb --push_to_hub"),
    ("textual_inversion/README_sdxl.md:7", TEXTUAL_INVERSION,
     f"--pretrained_model_name_or_path={SDXL} --train_data_dir=./cat --learnable_property=object "
     "'--placeholder_token=<cat-toy>' --initializer_token=toy --mixed_precision=bf16 --resolution=768 "
     "--train_batch_size=1 --gradient_accumulation_steps=4 --max_train_steps=500 --learning_rate=5.0e-04 --scale_lr "
     "--lr_scheduler=constant --lr_warmup_steps=0 --save_as_full_pipeline --output_dir=./textual_inversion_cat_sdxl"),
]
# The flags their READMEs add to the first command in prose and snippets (DoRA, Kohya export, EDM-style training).
SDXL_SNIPPETS = ["--use_dora", "--output_kohya_format", "--do_edm_style_training",
                 "--enable_xformers_memory_efficient_attention --gradient_checkpointing --use_8bit_adam "
                 "--mixed_precision=fp16"]


@pytest.mark.parametrize("source, script, command", SDXL_COMMANDS, ids=[c[0] for c in SDXL_COMMANDS])
def test_upstream_sdxl_command_parses_with_only_the_script_name_changed(upstream_cwd, source, script, command):
    args = parse(script, command)
    if "--pretrained_vae_model_name_or_path" in command:
        assert args.pretrained_vae_model_name_or_path == SDXL_VAE
    assert args.resolution == int(command.split("--resolution=")[1].split()[0])


@pytest.mark.parametrize("snippet", SDXL_SNIPPETS)
def test_upstream_sdxl_flag_snippets_parse_appended_to_the_first_command(upstream_cwd, snippet):
    args = parse(LORA, f"{SDXL_COMMANDS[0][2]} {snippet}")
    flag = snippet.split()[0].lstrip("-")
    assert getattr(args, flag) is True


def test_upstream_sdxl_text_to_image_command_runs_on_the_tiny_sdxl_victim(tiny_sdxl_victim, sdxl_synthetic_dataset,
                                                                          tmp_path):
    """C4 (README_sdxl.md:225) through `accelerate launch` with only the script name changed: its model, VAE and
    dataset are the tiny victim's (the naruto set's `image`/`text` columns), 1024 px is the victim's 16, 20 steps 2."""
    import datasets
    from conftest import launch

    naruto = datasets.load_from_disk(str(sdxl_synthetic_dataset)).rename_column("prompt", "text")
    naruto.save_to_disk(str(tmp_path / "naruto"))
    command = SDXL_COMMANDS[3][2].replace(SDXL_VAE, str(tiny_sdxl_victim / "pipeline" / "vae")).replace(
        SDXL, str(tiny_sdxl_victim / "pipeline")).replace(NARUTO, str(tmp_path / "naruto")).replace(
        "--resolution=1024", "--resolution=16").replace("--max_train_steps=20", "--max_train_steps=2").replace(
        "--output_dir=sd-naruto-model-lora-sdxl", f"--output_dir={tmp_path / 'out'}")
    launch("train_lora_mixsyn.py", shlex.split(command))
    output = tmp_path / "out"
    assert (output / "pytorch_lora_weights.safetensors").is_file() and (output / "checkpoint-2").is_dir()
    assert (output / "image_0.png").is_file()  # the validation prompt, after training
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_victim / "pipeline"), add_watermarker=False)
    pipeline.load_lora_weights(str(output))
