"""Write the parity fixtures of the Wan2.1 port from diffusers (PyTorch), an implementation written elsewhere.

Runs where torch and diffusers are installed, never in this project's environment (neither is a dependency):

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch==2.13.0 diffusers safetensors transformers numpy   # CPU torch is enough
    /tmp/venv-torch/bin/python experiments/wan/make_parity_fixtures.py --out tests/experiments/fixtures/wan

The script imports neither jax nor this project. It writes, under --out:

  tiny_diffusers/transformer/   `WanTransformer3DModel.save_pretrained` of a tiny random model (dim 128 = 2 heads
                                x 64, 2 layers, FFN 192, text_dim 32, freq_dim 32), sharded by diffusers itself:
                                config.json, diffusion_pytorch_model-0000k-of-0000n.safetensors and
                                diffusion_pytorch_model.safetensors.index.json (the layout of the Hub's
                                Wan-AI/Wan2.1-T2V-*-Diffusers repositories)
  tiny_diffusers/scheduler/     scheduler_config.json: UniPCMultistepScheduler with Wan's settings
  transformer_io.npz            x (2, 16, 3, 8, 12) f32 latents, t (2,) f32 timesteps, context (2, 16, 32) f32 text
                                embeddings (tokens 7.. of row 0 and 11.. of row 1 zero, as the pipeline pads them),
                                out (2, 16, 3, 8, 12) f32 = transformer(x, t, context) in float32
  schedulers.npz                for each scheduler (euler: FlowMatchEulerDiscreteScheduler(shift), unipc:
                                UniPCMultistepScheduler with Wan's settings) at shift 3 and 5: the timesteps and
                                sigmas of 8- and 50-step schedules; and an 8-step chain of `scheduler.step` on
                                random model outputs: `{name}_s{shift}_outputs` (8, 1, 16, 2, 4, 4) f32, the
                                start sample `{name}_s{shift}_x0` and every sample after a step `_chain` (8, ...)
  pipeline.npz                  WanPipeline (text encoder, tokenizer and VAE left out; output_type="latent") with
                                the tiny transformer: 4 steps, guidance 5.0, shift 3.0, for unipc and euler:
                                latents_in (1, 16, 2, 8, 12) f32, prompt_embeds / negative_prompt_embeds
                                (1, 16, 32) f32, `{name}_latents_out`
  info.json                     diffusers, torch, numpy and Python versions, configs, seed and this command
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys

import numpy as np
import torch

TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=192, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                        rope_max_seq_len=1024)
TEXT_LEN = 16
# UniPC as in the scheduler_config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers; flow_shift is set per run.
WAN_UNIPC = dict(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", predict_x0=True,
                 solver_type="bh2", lower_order_final=True, use_flow_sigmas=True, final_sigmas_type="zero",
                 timestep_spacing="linspace", disable_corrector=[])


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _text(gen, batch, lengths):
    """(batch, TEXT_LEN, text_dim) random embeddings, zero past each row's length (the pipeline's padding)."""
    context = _randn(gen, batch, TEXT_LEN, TINY_TRANSFORMER["text_dim"])
    for row, length in enumerate(lengths):
        context[row, length:] = 0.0
    return context


def _schedulers(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
    return {"euler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
            "unipc": UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=shift)}


def make_transformer(out: str, gen: torch.Generator):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(1234)
    model = WanTransformer3DModel(**TINY_TRANSFORMER).eval()
    with torch.no_grad():
        # diffusers initialises some tensors to constants (norm weights 1, biases 0, and proj_out is small);
        # randomise every tensor at a scale where each block, gate and norm moves the output by a large fraction,
        # so that a transposed, swapped or misplaced weight cannot hide below the tolerance.
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * _randn(gen, *p.shape))
            elif p.ndim >= 2 and "scale_shift_table" not in name:
                p.copy_(_randn(gen, *p.shape) / (p[0].numel() ** 0.5))       # fan-in scaled
            else:
                p.copy_(0.5 * _randn(gen, *p.shape))                          # biases, scale_shift_table
    directory = os.path.join(out, "tiny_diffusers", "transformer")
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="1MB")

    x = _randn(gen, 2, 16, 3, 8, 12)
    t = torch.tensor([999.0, 437.0])
    context = _text(gen, 2, [7, 11])
    with torch.no_grad():
        y = model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
    np.savez(os.path.join(out, "transformer_io.npz"), x=x.numpy(), t=t.numpy(), context=context.numpy(),
             out=y.numpy())
    return model


def make_schedulers(out: str, gen: torch.Generator):
    arrays = {}
    shape = (1, 16, 2, 4, 4)
    for shift in (3.0, 5.0):
        for name, scheduler in _schedulers(shift).items():
            key = f"{name}_s{shift:g}"
            for steps in (8, 50):
                scheduler.set_timesteps(steps)
                arrays[f"{key}_n{steps}_timesteps"] = scheduler.timesteps.numpy()
                arrays[f"{key}_n{steps}_sigmas"] = scheduler.sigmas.numpy()
            scheduler.set_timesteps(8)
            sample = _randn(gen, *shape)
            outputs = _randn(gen, 8, *shape)
            arrays[f"{key}_x0"], arrays[f"{key}_outputs"] = sample.numpy(), outputs.numpy()
            chain = []
            for i, t in enumerate(scheduler.timesteps):
                sample = scheduler.step(outputs[i], t, sample, return_dict=False)[0]
                chain.append(sample.numpy())
            arrays[f"{key}_chain"] = np.stack(chain)
    np.savez(os.path.join(out, "schedulers.npz"), **arrays)


def make_pipeline(out: str, gen: torch.Generator, transformer):
    from diffusers import WanPipeline

    latents = _randn(gen, 1, 16, 2, 8, 12)
    prompt = _text(gen, 1, [9])
    negative = _text(gen, 1, [4])
    arrays = {"latents_in": latents.numpy(), "prompt_embeds": prompt.numpy(), "negative_prompt_embeds": negative.numpy()}
    for name, scheduler in _schedulers(3.0).items():
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            result = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=latents.clone(),
                          height=64, width=96, num_frames=5, num_inference_steps=4, guidance_scale=5.0,
                          output_type="latent", return_dict=False)[0]
        arrays[f"{name}_latents_out"] = result.numpy()
    np.savez(os.path.join(out, "pipeline.npz"), **arrays)
    scheduler_dir = os.path.join(out, "tiny_diffusers", "scheduler")
    os.makedirs(scheduler_dir, exist_ok=True)
    _schedulers(3.0)["unipc"].save_config(scheduler_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/experiments/fixtures/wan")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import diffusers

    torch.set_num_threads(1)   # deterministic reductions
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    transformer = make_transformer(args.out, gen)
    make_schedulers(args.out, gen)
    make_pipeline(args.out, gen, transformer)
    info = {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "seed": args.seed, "transformer_config": TINY_TRANSFORMER,
            "text_len": TEXT_LEN, "unipc_config": WAN_UNIPC, "pipeline": dict(steps=4, guidance_scale=5.0, shift=3.0),
            "command": "python experiments/wan/make_parity_fixtures.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(args.out, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(args.out) for n in names)
    print(f"wrote {args.out} ({total / 1e6:.2f} MB): {json.dumps(info)}")


if __name__ == "__main__":
    main()
