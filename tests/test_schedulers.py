"""Schedulers: timesteps and whole sampling loops against the diffusers (torch) schedulers, config handling, and the
training helpers. Parity loops run our side in float64 (``jax.enable_x64``) against torch float64 samples; diffusers
Euler and DPM-Solver cast the sample to float32 inside ``step``, which bounds the agreement to ~1e-6.
"""

import inspect
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pmf_jax.errors import PMFInputError
from pmf_jax.schedulers import KNOWN_KEYS, SCHEDULERS, from_pretrained, make_scheduler

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

TORCH_CLASS = {name: getattr(diffusers, cls.DIFFUSERS_CLASS) for name, cls in SCHEDULERS.items()}

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
V_TRAILING = {**SD_BETAS, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
ZERO_SNR = {**V_TRAILING, "rescale_betas_zero_snr": True}
KARRAS = {**SD15, "use_karras_sigmas": True}


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def toy_model(x, t, lib):
    """A fixed nonlinear 'denoiser' of (x, t), written once for numpy-like libraries (torch, jax.numpy)."""
    t = t / 1000.0
    return 0.9 * lib.tanh(x) + 0.3 * lib.cos(3.0 * t + 0.5 * x) * (1.0 - t)


def torch_loop(name, config, n, x_T, seed=0, float64_tables=False):
    """A diffusers pipeline loop; returns (x0, timesteps, the per-step noise DDPM drew (zeros where none)).

    ``float64_tables`` promotes DDPM's float32 ᾱ table to float64 so its per-step scalars are computed in float64.
    """
    s = TORCH_CLASS[name].from_config(config)
    if float64_tables:
        s.alphas_cumprod, s.one = s.alphas_cumprod.double(), s.one.double()
    s.set_timesteps(n)
    gen, replay = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x = torch.from_numpy(x_T) * s.init_noise_sigma
    noise = np.zeros((len(s.timesteps),) + x_T.shape)
    for i, t in enumerate(s.timesteps):
        out = toy_model(s.scale_model_input(x, t), t.to(torch.float64), torch)
        if name == "ddpm":
            if t > 0:  # DDPM.step draws exactly this from its generator when t > 0
                noise[i] = torch.randn(x_T.shape, generator=replay, dtype=torch.float64).numpy()
            x = s.step(out, t, x, generator=gen).prev_sample
        else:
            x = s.step(out, t, x).prev_sample
    return x.numpy(), s.timesteps.numpy(), noise


def assert_same_timesteps(name, config, got, want):
    assert got.dtype.kind == want.dtype.kind
    if name == "euler" and config.get("use_karras_sigmas"):
        # fractional timesteps from σ ↦ t: torch's float32 linspace betas differ from ours in the last bit, so
        # these agree to float32 precision, not bitwise (integer grids are exact)
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-4)
    else:
        assert np.array_equal(got, want), (config, got[:5], want[:5])


PARITY = [
    ("ddpm", SD15, 25), ("ddpm", {}, 50), ("ddpm", {**V_TRAILING, "variance_type": "fixed_large"}, 20),
    ("ddpm", {"prediction_type": "sample", "timestep_spacing": "linspace"}, 20),
    ("ddim", SD15, 20), ("ddim", {}, 50), ("ddim", {**V_TRAILING, "set_alpha_to_one": True}, 25),
    ("ddim", {**ZERO_SNR, "timestep_spacing": "linspace"}, 20), ("ddim", {"prediction_type": "sample"}, 20),
    ("ddim", V_TRAILING, 7),  # t' = t − T // n is off the trailing grid when n does not divide T
    ("euler", SD15, 20), ("euler", {}, 25), ("euler", V_TRAILING, 20), ("euler", ZERO_SNR, 20),
    ("euler", {**KARRAS, "final_sigmas_type": "sigma_min"}, 25),
    ("dpmpp_2m", SD15, 20), ("dpmpp_2m", KARRAS, 25), ("dpmpp_2m", V_TRAILING, 50), ("dpmpp_2m", SD15, 10),
    ("dpmpp_2m", {**SD15, "final_sigmas_type": "sigma_min", "lower_order_final": False}, 10),
    ("dpmpp_2m", {**KARRAS, "final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp_2m", {**ZERO_SNR, "euler_at_final": True}, 20),
    ("dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2", "solver_order": 1}, 20),
    ("unipc", SD15, 20), ("unipc", KARRAS, 25), ("unipc", V_TRAILING, 50), ("unipc", ZERO_SNR, 20),
    ("unipc", {**SD15, "disable_corrector": [0, 3], "solver_order": 1}, 12),
    ("unipc", {**SD15, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 10),
    ("unipc", {**KARRAS, "final_sigmas_type": "sigma_min", "sigma_min": 0.1, "sigma_max": 10.0}, 20),
    ("unipc", {**SD15, "prediction_type": "sample"}, 20),
]


@pytest.mark.parametrize("name,config,n", PARITY)
def test_sample_matches_diffusers_loop(name, config, n):
    x_T = np.random.RandomState(n).randn(2, 3, 3, 2)
    ref, ref_ts, noise = torch_loop(name, config, n, x_T.transpose(0, 3, 1, 2))
    s = make_scheduler(name, config)
    assert_same_timesteps(name, config, s.timesteps(n), ref_ts)
    with jax.enable_x64(True):
        run = jax.jit(lambda x, noise: s.sample(lambda x, t: toy_model(x, t.astype(jnp.float64), jnp), x, n,
                                                noise=noise if name == "ddpm" else None))
        ours = run(jnp.asarray(x_T), jnp.asarray(noise.transpose(0, 1, 3, 4, 2)))
        assert ours.dtype == jnp.float64
    assert np.all(np.isfinite(ref))
    assert rel_err(ours, ref.transpose(0, 2, 3, 1)) < 1e-5


def test_ddpm_1000_steps_matches_diffusers():
    # Over 1000 steps each step's β̃ = 1 − ᾱ_t/ᾱ_{t−1} ≈ 1e-3 is a difference of nearly equal numbers: diffusers
    # takes it in float32 (and its float32 torch.linspace betas differ from numpy's in the last bit), which moves
    # x0 by ~1e-5 relative. With the same betas (trained_betas) and float64 scalars the loops agree to ~1e-15.
    betas = diffusers.DDPMScheduler(**SD_BETAS).betas.tolist()
    config = {"trained_betas": betas, "clip_sample": False}
    x_T = np.random.RandomState(0).randn(2, 2, 3, 3)
    ref, _, noise = torch_loop("ddpm", config, 1000, x_T, float64_tables=True)
    stock, _, _ = torch_loop("ddpm", config, 1000, x_T)
    s = make_scheduler("ddpm", config)
    with jax.enable_x64(True):
        ours = s.sample(lambda x, t: toy_model(x, t.astype(jnp.float64), jnp), jnp.asarray(x_T), 1000,
                        noise=jnp.asarray(noise))   # the toy model is elementwise: NCHW is fine here
    assert rel_err(ours, ref) < 1e-12
    assert rel_err(ours, stock) < 1e-4


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_timesteps_equal_diffusers(name):
    configs = [SD15, {**SD15, "timestep_spacing": "trailing"}, {**SD15, "timestep_spacing": "linspace"},
               {"num_train_timesteps": 500, "timestep_spacing": "leading"}]
    if name in ("euler", "dpmpp_2m", "unipc"):
        configs.append(KARRAS)
    if name in ("euler", "unipc"):
        # (DPM-Solver truncates instead of rounding the cosine schedule's Karras timesteps, which then sit on a
        # knife edge: 998.99999 vs 999.0 depends on the last bit of torch's float32 sqrt; and diffusers' own
        # loop crashes on the duplicate first timestep it produces)
        configs.append({"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"})
    for config in configs:
        ref = TORCH_CLASS[name].from_config(config)
        ours = make_scheduler(name, config)
        for n in (1, 7, 20, 25, 50, 500, 1000):
            if n > config.get("num_train_timesteps", 1000) or (n == 1 and config.get("use_karras_sigmas")):
                continue
            if n == 1000 and name in ("ddpm", "ddim") and config is SD15:
                with pytest.raises(PMFInputError, match="steps_offset"):  # t = 1000: diffusers fails mid-loop
                    ours.timesteps(n)
                continue
            ref.set_timesteps(n)
            assert_same_timesteps(name, config, ours.timesteps(n), ref.timesteps.numpy())


def test_trailing_grid_keeps_n_steps_where_diffusers_adds_one():
    ref = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1   # the diffusers quirk we do not copy
    got = make_scheduler("ddim", {"timestep_spacing": "trailing"}).timesteps(61)
    assert np.array_equal(got, ref.timesteps.numpy()[:61])


def test_step_api_loop_equals_sample_and_keeps_dtype():
    s = make_scheduler("unipc", SD15)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 3))
    model = lambda x, t: toy_model(x, t.astype(jnp.float32), jnp)  # noqa: E731
    state = s.init_state(8, x_T)
    x = x_T * state.init_noise_sigma
    step = jax.jit(lambda state, out, x: s.step(state, out, x))
    for i in range(8):
        assert int(state.step_index) == i and int(state.timestep) == int(s.timesteps(8)[i])
        state, x = step(state, model(s.scale_model_input(state, x), state.timestep), x)
    np.testing.assert_allclose(x, jax.jit(lambda x: s.sample(model, x, 8))(x_T), rtol=1e-6, atol=1e-6)

    # the scheduler is a static (hashable) jit argument; bf16 in -> bf16 out, computed in float32
    run = jax.jit(lambda s, x: s.sample(model, x, 8), static_argnums=0)
    assert hash(s) == hash(make_scheduler("unipc", SD15)) and s == make_scheduler("unipc", SD15)
    out_bf16 = run(s, x_T.astype(jnp.bfloat16))
    assert out_bf16.dtype == jnp.bfloat16
    assert rel_err(out_bf16.astype(jnp.float32), x) < 2e-2


def test_euler_scales_model_input_and_init_noise():
    s = make_scheduler("euler", SD15)
    ref = diffusers.EulerDiscreteScheduler.from_config(SD15)
    ref.set_timesteps(20)
    state = s.init_state(20, jnp.zeros((1, 2, 2, 1)))
    np.testing.assert_allclose(state.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)
    x = jnp.ones((1, 2, 2, 1))
    want = ref.scale_model_input(torch.ones(1, 1, 2, 2), ref.timesteps[0])
    np.testing.assert_allclose(s.scale_model_input(state, x)[0, 0, 0, 0], want[0, 0, 0, 0], rtol=1e-6)


def test_ddpm_sampling_with_key_is_reproducible():
    s = make_scheduler("ddpm", SD15)
    model = lambda x, t: toy_model(x, t.astype(jnp.float32), jnp)  # noqa: E731
    run = jax.jit(lambda x, key: s.sample(model, x, 10, key=key))
    x_T = jnp.zeros((1, 2, 2, 1))
    a, b, c = run(x_T, jax.random.PRNGKey(1)), run(x_T, jax.random.PRNGKey(1)), run(x_T, jax.random.PRNGKey(2))
    assert np.array_equal(a, b) and not np.allclose(a, c) and np.all(np.isfinite(a))
    with pytest.raises(PMFInputError, match="key"):
        s.sample(model, x_T, 10)
    with pytest.raises(PMFInputError, match="noise"):
        s.step(s.init_state(10, x_T), x_T, x_T)


def test_sample_draws_step_noise_as_the_pipelines_do():
    """One noise convention: sample(key=key(s)) gives image b the key fold_in(key(s), b) and draws step i from its
    stream 1 + i, as a pipeline call with seed s does (pmf_jax.schedulers.noise)."""
    from pmf_jax.schedulers import noise

    s = make_scheduler("ddpm", SD15)
    model = lambda x, t: toy_model(x, t.astype(jnp.float32), jnp)  # noqa: E731
    x_T = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    keys = noise.row_keys(jnp.full((3,), 7, jnp.uint32), jnp.arange(3, dtype=jnp.int32))
    steps = jnp.stack([noise.row_normal(keys, noise.step_stream(i), x_T.shape[1:]) for i in range(10)])
    want = s.sample(model, x_T, 10, noise=steps)
    np.testing.assert_allclose(s.sample(model, x_T, 10, key=jax.random.key(7)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.sample(model, x_T, 10, key=keys), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.sample(model, x_T, 10, key=jax.random.PRNGKey(7)), want, rtol=1e-6, atol=1e-6)


def test_add_noise_velocity_snr_match_diffusers():
    config = {**SD15, "num_train_timesteps": 1000}
    ref = diffusers.DDPMScheduler.from_config(config)
    x0, noise = np.random.RandomState(0).randn(2, 4, 3, 3, 2).astype(np.float32)
    t = np.array([0, 999, 500, 17])
    for name in SCHEDULERS:  # all schedulers share the training forward process
        s = make_scheduler(name, config)
        want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
        np.testing.assert_allclose(s.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want,
                                   rtol=1e-5, atol=1e-6)
    want = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(s.velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want,
                               rtol=1e-5, atol=1e-6)
    acp = ref.alphas_cumprod.numpy()[t]
    np.testing.assert_allclose(s.snr(jnp.asarray(t)), acp / (1 - acp), rtol=1e-5)
    # a scalar timestep broadcasts over the batch, under jit
    scalar_t = jax.jit(s.add_noise)(x0, noise, 999)
    assert scalar_t.shape == x0.shape
    np.testing.assert_allclose(scalar_t, s.add_noise(x0, noise, np.full(4, 999)), rtol=1e-6, atol=1e-7)


def test_config_keys_are_exactly_diffusers_keys():
    for cls in SCHEDULERS.values():
        params = set(inspect.signature(getattr(diffusers, cls.DIFFUSERS_CLASS).__init__).parameters) - {"self"}
        assert cls.config_keys() == params, cls.DIFFUSERS_CLASS
    assert set(inspect.signature(diffusers.PNDMScheduler.__init__).parameters) - {"self"} <= KNOWN_KEYS


def test_config_errors_name_the_key():
    cases = [
        ("ddim", {"not_a_key": 1}, "not_a_key"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("ddim", {"prediction_type": "flow"}, "prediction_type"),
        ("ddim", {"num_train_timesteps": "1000"}, "num_train_timesteps"),
        ("ddim", {"beta_schedule": "sigmoid"}, "beta_schedule"),
        ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ("dpmpp_2m", {"solver_order": 3}, "solver_order"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("unipc", {"predict_x0": False}, "predict_x0"),
        ("unipc", {"lower_order_final": False}, "lower_order_final"),
        ("ddpm", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ("ddpm", {"variance_type": "learned"}, "variance_type"),
        ("nope", {}, "nope"),
    ]
    for name, config, key in cases:
        with pytest.raises(PMFInputError, match=key):
            make_scheduler(name, config)
    with pytest.raises(PMFInputError, match="num_steps"):
        make_scheduler("ddim").timesteps(1001)
    with pytest.raises(PMFInputError, match="repeats timesteps"):  # linspace over 1001 points: h = 0 somewhere
        make_scheduler("unipc").init_state(1000, jnp.zeros((1, 1)))
    with pytest.raises(PMFInputError, match="steps_offset"):  # t = 1000 (diffusers: IndexError mid-loop)
        make_scheduler("ddpm", SD15).timesteps(1000)


def test_other_schedulers_keys_are_ignored_like_diffusers_from_config():
    # keys of another class are dropped by make_scheduler (and by diffusers' from_config), not by the strict class
    s = make_scheduler("ddim", {"use_karras_sigmas": True, "solver_order": 3, "skip_prk_steps": True})
    assert s == make_scheduler("ddim")
    with pytest.raises(PMFInputError, match="use_karras_sigmas"):
        SCHEDULERS["ddim"].from_config({"use_karras_sigmas": True})
    # solver_type spellings diffusers rewrites across DPM-Solver / UniPC configs
    assert make_scheduler("dpmpp_2m", {"solver_type": "bh2"}).timesteps(5).shape == (5,)
    assert make_scheduler("unipc", {"solver_type": "midpoint"}).timesteps(5).shape == (5,)
    assert make_scheduler("euler", {"prediction_type": "original_sample"}).prediction_type == "sample"
    unipc_cfg = diffusers.UniPCMultistepScheduler.from_config(SD15).config
    assert make_scheduler("dpmpp_2m", dict(unipc_cfg)) == make_scheduler("dpmpp_2m", SD15)


def test_from_pretrained(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15))
    s = from_pretrained(tmp_path, "unipc")
    assert s.steps_offset == 1 and s.beta_schedule == "scaled_linear"
    with pytest.raises(PMFInputError, match="PNDMScheduler"):
        from_pretrained(tmp_path)
    ddim_dir = tmp_path / "ddim"
    diffusers.DDIMScheduler.from_config(SD15).save_pretrained(ddim_dir)
    assert from_pretrained(ddim_dir) == make_scheduler("ddim", SD15)
