"""One retarget pipeline per run (pmf_jax.pipelines.from_run): the trainer's previews build it once and compile it
once, and they, pipeline_from_run and the pipeline built by hand from the run's parts make the same images; a config's
sampling section means what the CLI's options mean."""

from pathlib import Path

import jax
import numpy as np
import pytest

import train_fixtures
from compile_counter import CompileCounter
from pmf_jax.config import load_config
from pmf_jax.pipelines import RetargetPipeline
from pmf_jax.pipelines.from_run import RunParts, pipeline_from_run, sampling_kwargs, sampling_static
from pmf_jax.training import components as components_lib
from train.logs import image_grid
from train.previews import Previews

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "tiny_synthetic.yaml")


class Writer:
    """Keeps the preview grids by step (instead of TensorBoard)."""

    def __init__(self):
        self.grids = {}

    def image(self, step, tag, grid):
        self.grids[step] = grid


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return train_fixtures.prepare(tmp_path_factory.mktemp("from_run"))


def _run(env, run_dir, *extra) -> RunParts:
    cfg = load_config(CONFIG, train_fixtures.overrides(env, run_dir, "sampling.steps=2", *extra))
    comps, params, frozen = components_lib.build(cfg, jax.random.key(0))
    return RunParts(cfg, comps, params, frozen)


@pytest.fixture(scope="module")
def run(env, tmp_path_factory):
    return _run(env, tmp_path_factory.mktemp("run"))


def _to_u8(x, low):
    return np.round((np.clip(x, low, 1) - low) / (1 - low) * 255).astype(np.uint8)


def test_previews_build_one_pipeline_and_compile_it_once(run, tmp_path):
    writer = Writer()
    previews = Previews(run.cfg, run.components, run.frozen, writer, tmp_path)
    previews(1, run.params, {})
    pipe = previews.pipeline
    assert pipe.compiled_programs() == 3  # prologue, loop, epilogue
    moved = jax.tree.map(lambda x: x * 0.9, run.params)  # the next preview's (trained further) parameters
    with CompileCounter() as counter:
        previews(2, moved, {})
    assert counter.count == 0, "a later preview must reuse the compiled programs"
    assert previews.pipeline is pipe and pipe.compiled_programs() == 3
    assert np.abs(writer.grids[2].astype(float) - writer.grids[1]).mean() > 0.1  # the new parameters were used
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step_0000001.png", "step_0000002.png"]


def test_previews_and_pipeline_from_run_make_the_images_of_the_hand_built_pipeline(run, tmp_path):
    from pmf_jax.training.components import sampling_scheduler_config

    cfg, comps, params, frozen = run.cfg, run.components, run.params, run.frozen
    writer = Writer()
    previews = Previews(cfg, comps, frozen, writer, tmp_path)
    previews(1, params, {})
    batch = previews.batch
    sources, poses = list(_to_u8(batch["source"], -1.0)), list(_to_u8(batch["pose"], 0.0))
    height, width = cfg.data.height_width
    call = dict(height=height, width=width, seed=cfg.sampling.seed, pose_kind="skeleton", output_type="np")
    # the pipeline as previews and the demo's evaluation built it by hand before pipeline_from_run
    parts = dict(unet=(comps.unet, params["unet"]), controlnet=(comps.controlnet, params["controlnet"]),
                 vae=(comps.autoencoder, frozen["autoencoder"]), context=np.asarray(frozen["context"][0]),
                 scheduler_config=sampling_scheduler_config(comps, cfg.train.prediction_type))
    by_hand = dict(num_inference_steps=cfg.sampling.steps, guidance_scale=cfg.sampling.text_guidance_scale,
                   scheduler=cfg.sampling.scheduler, reference_config=cfg.reference.to_reference_config(), **call)
    for mode in ("acm", "controlnet_only"):
        ref = dict(reference_unet=(comps.reference_unet, params["reference_unet"])) if mode == "acm" else {}
        want = RetargetPipeline(**parts, **ref, mode=mode)(sources, poses, **by_hand)
        got = pipeline_from_run(run, mode=mode)(sources, poses, **call, **sampling_kwargs(cfg, mode))
        np.testing.assert_array_equal(got, want)
        if mode == "acm":
            np.testing.assert_array_equal(writer.grids[1], image_grid([batch["source"], batch["pose"], got,
                                                                       batch["target"]]))


def test_sampling_section_means_what_the_cli_options_mean(env, run, tmp_path):
    pipe = pipeline_from_run(run)
    kw = sampling_kwargs(run.cfg)  # the demo config: reference_guidance_scale null
    # no text encoder and style_fidelity 0: the text-guidance row would equal the conditional row, so one row
    assert kw["appearance_guidance_scale"] is None and sampling_static(pipe, run.cfg, (64, 64)).rows == 1
    assert kw["num_inference_steps"] == 2 and kw["scheduler"] == run.cfg.sampling.scheduler
    cfg = load_config(CONFIG, train_fixtures.overrides(env, tmp_path, "sampling.reference_guidance_scale=1.0",
                                                       "sampling.controlnet_scale=0.5"))
    kw = sampling_kwargs(cfg)
    assert kw["appearance_guidance_scale"] == 1.0 and kw["controlnet_conditioning_scale"] == 0.5  # 1.0 is on
    static = sampling_static(pipe, cfg, (64, 64))
    assert static.rows == 2 and static.reference == cfg.reference.to_reference_config()  # [a, c]: u = a
    assert sampling_kwargs(cfg, "controlnet_only")["appearance_guidance_scale"] is None  # no reference to guide
    assert sampling_static(pipeline_from_run(run, mode="controlnet_only"), cfg, (64, 64)).reference is None
