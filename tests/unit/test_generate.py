"""copyscan generate without Ray: sampling a tiny randomly initialised Stable Diffusion pipeline on the CPU
(seeds, the memorisation score against a direct recomputation), prompt sources and the plan."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.config import resolve
from copyscan.search.generate import prompts as gp
from copyscan.search.generate.config import GenerateConfig
from copyscan.search.generate.sampling import Sampler, SampleSettings, checkpoint_id

SETTINGS = SampleSettings(steps=4, guidance=7.5, width=32, height=24, score_steps=2)


@pytest.fixture(scope="module")
def sampler(tiny_sd_checkpoint):
    import torch

    # one thread: the tiny model's ops are too small to share, and on a loaded 2-core machine a second
    # thread's barrier costs 30x (0.3 s against 9 s per generation of 4 steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Sampler(tiny_sd_checkpoint, "cpu")
    torch.set_num_threads(threads)


def test_seeds_reproduce_generations_whatever_the_batch(sampler):
    alone = sampler.sample(["a red cat"], [11], SETTINGS)
    batched = sampler.sample(["a blue dog", "a red cat", "a red cat"], [5, 11, 12], SETTINGS)
    assert alone.images.shape == (1, 24, 32, 3) and alone.images.dtype == np.uint8
    assert alone.norms.shape == (1, SETTINGS.steps) and alone.norms.dtype == np.float32
    # the same (prompt, seed) in another batch: the same image up to float rounding
    assert np.abs(alone.images[0].astype(int) - batched.images[1]).max() <= 1
    np.testing.assert_allclose(alone.norms[0], batched.norms[1], rtol=1e-4)
    again = sampler.sample(["a red cat"], [11], SETTINGS)
    assert np.array_equal(again.images, alone.images) and np.array_equal(again.norms, alone.norms)
    # another seed, another prompt: other images
    assert np.abs(batched.images[2].astype(int) - batched.images[1]).mean() > 2
    assert np.abs(batched.images[0].astype(int) - batched.images[1]).mean() > 2


def test_the_loop_samples_what_the_diffusers_pipeline_samples(sampler):
    """The guided loop over the pipeline's components gives the image of ``StableDiffusionPipeline.__call__``
    from the same initial noise: the score is read off ordinary sampling."""
    import torch

    ours = sampler.sample(["a blue dog"], [7], SETTINGS)
    noise = torch.randn((1, 4, 12, 16), generator=torch.Generator().manual_seed(7))
    theirs = sampler.pipe(
        "a blue dog",
        num_inference_steps=SETTINGS.steps,
        guidance_scale=SETTINGS.guidance,
        width=SETTINGS.width,
        height=SETTINGS.height,
        latents=noise,
        output_type="np",
    ).images
    assert np.abs((theirs[0] * 255).round().astype(int) - ours.images[0]).max() <= 1


def test_score_equals_a_direct_recomputation(sampler):
    """d_0 from two separate UNet calls (text, then the empty prompt) on the seed's initial latents; the
    score is the mean of the first ``score_steps`` d_i."""
    import torch

    batch = sampler.sample(["a painting of a memorised cat", "x"], [3, 4], SETTINGS)
    pipe = sampler.pipe
    with torch.no_grad():
        ids = [
            pipe.tokenizer(t, padding="max_length", max_length=77, return_tensors="pt").input_ids
            for t in ("a painting of a memorised cat", "")
        ]
        cond, empty = (pipe.text_encoder(i)[0] for i in ids)
        pipe.scheduler.set_timesteps(SETTINGS.steps)
        t0 = pipe.scheduler.timesteps[0]
        x = (
            torch.randn((1, 4, 12, 16), generator=torch.Generator().manual_seed(3))
            * pipe.scheduler.init_noise_sigma
        )
        x = pipe.scheduler.scale_model_input(x, t0)
        d0 = (
            pipe.unet(x, t0, encoder_hidden_states=cond).sample
            - pipe.unet(x, t0, encoder_hidden_states=empty).sample
        ).norm()
    assert batch.norms[0, 0] == pytest.approx(float(d0), rel=1e-4)
    assert batch.scores[0] == pytest.approx(float(batch.norms[0, :2].mean()), rel=1e-6)
    assert (batch.norms > 0).all() and batch.norms[0, 0] != pytest.approx(batch.norms[1, 0], rel=1e-3)


def test_checkpoint_id_follows_configs_and_sizes(tiny_sd_checkpoint, tmp_path):
    import shutil

    ident = checkpoint_id(tiny_sd_checkpoint)
    assert ident.startswith("tiny-sd@") and len(ident.split("@")[1]) == 12
    copy = tmp_path / "tiny-sd"
    shutil.copytree(tiny_sd_checkpoint, copy)
    assert checkpoint_id(str(copy)) == ident  # a copy is the same checkpoint
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert checkpoint_id(str(copy)) != ident
    with pytest.raises(CopyscanError, match="model_index.json"):
        checkpoint_id(str(tmp_path))


def test_prompt_sources_and_plan(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red cat\n\n  \na blue dog\na red cat\n")
    table = pa.table({"caption": ["x", None, "  ", "y"]})
    pq.write_table(table, tmp_path / "prompts.parquet")
    assert gp.read_prompt_file(str(text)) == (["a red cat", "a blue dog", "a red cat"], 2)
    assert gp.read_prompt_file(str(tmp_path / "prompts.parquet")) == (["x", "y"], 2)
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(CopyscanError, match="none of the columns"):
        gp.read_prompt_file(str(tmp_path / "bad.parquet"))
    cfg = resolve(
        GenerateConfig, {"checkpoint": "c", "out": "o", "prompts": str(text), "prompts_per_shard": 1}
    )
    plan, counts = gp.make_plan(cfg)
    assert plan.schema.equals(gp.PLAN_SCHEMA)
    assert plan["prompt"].to_pylist() == ["a red cat", "a blue dog"] and plan["shard"].to_pylist() == [0, 1]
    assert counts == {"blank_prompts": 2, "repeated_prompts": 1}
    # seeds: a function of (seed, prompt, generation) alone
    seeds = [gp.generation_seed(0, "a red cat", g) for g in range(3)]
    assert len(set(seeds)) == 3 and seeds[0] == gp.generation_seed(0, "a red cat", 0)
    assert gp.generation_seed(1, "a red cat", 0) != seeds[0] and 0 <= min(seeds) and max(seeds) < 2**31


def test_caption_picks_are_seeded():
    counts = {f"caption {i}": 1 + i % 4 for i in range(20)}
    a = gp.pick_captions(counts, 5, "random", seed=1)
    assert a == gp.pick_captions(counts, 5, "random", seed=1) != gp.pick_captions(counts, 5, "random", seed=2)
    assert len({c for c, _ in a}) == 5 and all(counts[c] == n for c, n in a)
    top = gp.pick_captions(counts, 5, "duplicated", seed=0)
    assert [n for _, n in top] == [4] * 5
    assert len(gp.pick_captions(counts, 50, "random", seed=0)) == 20


def test_a_run_without_prompts_is_refused():
    with pytest.raises(CopyscanError, match="no prompt source"):
        gp.make_plan(resolve(GenerateConfig, {"checkpoint": "c", "out": "o"}))


def test_config_problems():
    base = {"checkpoint": "c", "out": "o"}
    with pytest.raises(CopyscanError) as err:
        resolve(
            GenerateConfig,
            {**base, "guidance": 1.0, "width": 30, "score_steps": 60, "scheduler": "ancestral"},
        )
    text = str(err.value)
    for part in (
        "guidance must be > 1",
        "multiples of 8",
        "score_steps",
        "scheduler must be",
    ):
        assert part in text
