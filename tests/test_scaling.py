"""`pmf scaling` pieces that need one device: the SD1.5 shapes without weights, HLO collective parsing, the roofline
math, report rendering, and the CLI's input errors. The compiled 8-device programs are in
tests/multidevice/test_scaling.py."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmf_jax import cli
from pmf_jax.commands import scaling as command
from pmf_jax.config import load_config
from pmf_jax.scaling import abstract, collectives, report, roofline
from pmf_jax.scaling.compile import CompiledProgram
from train_fixtures import ONE_BLOCK_UNET

REPO = Path(__file__).resolve().parents[1]
SD15 = str(REPO / "configs" / "sd15_stage2.yaml")

HLO = """HloModule jit_step, entry_computation_layout={(f32[1024]{0})->f32[1024]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(f32[] %x, f32[] %y)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %gte = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %cp = f32[4,8]{1,0} collective-permute(%gte), channel_id=9, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}, metadata={op_name="x"}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %cp)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[1024], b: bf16[16,64]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %b = bf16[16,64]{1,0} parameter(1)
  %ar = (f32[1024]{0}, f32[2]{0}) all-reduce(%a, %c2), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %ag = bf16[64,64]{1,0} all-gather(%b), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %rs = f32[256]{0} reduce-scatter(%a), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %a2a = f32[8,16]{1,0} all-to-all(%x), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[1024]{0} get-tuple-element(%ar), index=0
}
"""


# ------------------------------------------------------------------------------------------------ abstract model

def test_sd15_stage2_shapes_without_weights():
    run = abstract.abstract_run(load_config(SD15))
    params = run.all_params()
    assert abstract.tree_count(params["unet"]) == 859_520_964          # SD1.5 UNet
    assert abstract.tree_count(params["controlnet"]) == 361_279_120    # control_v11p_sd15_openpose (test_controlnet)
    assert run.components.trainable == ("controlnet",)                  # the design's stage 2: ControlNet alone
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(run.state.params))      # fp32 master copy
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(run.frozen_params))    # frozen base UNet
    assert run.frozen["context"].shape == (1, 77, 768)
    trained = abstract.tree_bytes(run.state.params)
    assert abstract.tree_bytes(run.state.ema_params) == trained                       # ema_decay is set
    assert abs(abstract.tree_bytes(run.state.opt_state) / trained - 2.0) < 1e-3      # Adam mu + nu
    assert any("built-in SD1.5" in note for note in run.notes)


def test_sd15_ip_adapter_plans_with_the_public_parameter_counts():
    """The IP-Adapter recipe plans without its files: the adapter (projection + to_k_ip/to_v_ip of the 16 attn2
    layers) and the frozen ViT-H/14 image encoder have h94/IP-Adapter's parameter counts."""
    run = abstract.abstract_run(load_config(str(REPO / "configs" / "sd15_ip_adapter.yaml")))
    assert run.components.trainable == ("ip_adapter",)
    assert abstract.tree_count(run.state.params["ip_adapter"]) == 22_319_616       # ip-adapter_sd15.safetensors
    assert abstract.tree_count(run.frozen["image_encoder"]) == 632_076_800          # OpenCLIP ViT-H/14 vision
    flat = jax.tree_util.tree_flatten_with_path(run.state.params["ip_adapter"]["attn2"])[0]
    assert len(flat) == 32 and all("to_k_ip" in str(p) or "to_v_ip" in str(p) for p, _ in flat)
    assert any("IP-Adapter: SD1.5 layout" in note for note in run.notes)


def test_config_only_source_reads_configs_not_weights(tmp_path):
    unet = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "attention_head_dim": 2,
            "cross_attention_dim": 12, "norm_num_groups": 4}
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    for sub, config in (("unet", unet), ("vae", vae)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(config))   # no weights next to it
    cfg = load_config(SD15, [f"model.base={tmp_path}", "model.controlnet=null", "model.reference_unet=null",
                             "data.resolution=[16,16]"])
    run = abstract.abstract_run(cfg)
    assert run.frozen["context"].shape == (1, 77, 12)
    assert run.components.controlnet.block_out_channels == (8, 16)        # from the UNet (ControlNetModel.from_unet)
    assert sum("config.json read (no weights)" in n for n in run.notes) == 2


def test_per_device_bytes_follow_the_shardings():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    tree = {"a": jax.ShapeDtypeStruct((8, 4), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
    sh = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), tree)
    assert abstract.per_device_bytes(tree, sh) == abstract.tree_bytes(tree) == 8 * 4 * 4 + 3 * 2


# ------------------------------------------------------------------------------------------------ collectives

def test_parse_collectives_sizes_groups_and_loop_counts():
    found = {c.kind: c for c in collectives.parse_collectives(HLO, 8)}
    ar, ag, rs, a2a, cp = (found[k] for k in collectives.KINDS)
    assert (ar.group_size, ar.bytes, ar.wire_bytes) == (4, (1024 + 2) * 4, 2 * 3 / 4 * 4104)
    assert ar.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert (ag.group_size, ag.result_bytes, ag.operand_bytes, ag.wire_bytes) == (4, 8192, 2048, 6144)
    assert ag.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert (rs.group_size, rs.result_bytes, rs.operand_bytes, rs.bytes, rs.wire_bytes) == (4, 1024, 4096, 4096, 3072)
    assert (a2a.group_size, a2a.bytes, a2a.wire_bytes) == (8, 512, 448)
    assert (cp.bytes, cp.repeats, cp.groups) == (128, 5, ((0, 1), (1, 2), (2, 3), (3, 0)))   # inside while × 5
    summary = collectives.summarize(list(found.values()))
    assert summary["collective-permute"] == {"count": 5, "bytes": 640, "wire_bytes": 640.0}
    assert summary["all-reduce"]["count"] == 1


def test_replica_group_forms():
    groups = collectives.replica_groups
    assert groups("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert groups("replica_groups=[4,2]<=[2,4]T(1,0)") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert groups("replica_groups={}", 3) == ((0, 1, 2),)
    # a mesh over a permuted device list: data=2 (outer) x fsdp=4 as XLA prints it, grouped along fsdp
    line = "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, dims={0}"
    assert groups(line) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert groups("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=(0,2,1,3) {'axis_1'}") == ((0, 2), (1, 3))


# ------------------------------------------------------------------------------------------------ roofline

def test_roofline_terms_and_limit():
    chip = roofline.CHIPS["tpu-v5p"]
    pred = roofline.predict(459e12, 2765e9 * 0.5, [{"wire_bytes": 600e9 * 0.25, "repeats": 2, "groups": [(0, 1)]}],
                            chip)
    assert (pred.compute_s, pred.memory_s, pred.communication_s) == pytest.approx((1.0, 0.5, 0.5))
    assert pred.step_s == pytest.approx(1.0) and pred.limit == "compute"
    pred = roofline.predict(1e12, 0, [{"wire_bytes": 600e9 * 3}], chip)
    assert pred.limit == "communication" and pred.step_s == pytest.approx(3.0)


def test_gpu_collectives_across_nodes_use_the_slow_links():
    h100 = roofline.CHIPS["h100"]
    in_node, across = [tuple(range(8))], [tuple(range(16))]
    assert roofline.collective_seconds(450e9, in_node, h100) == pytest.approx(1.0)      # NVLink
    assert roofline.collective_seconds(50e9, across, h100) == pytest.approx(1.0)        # InfiniBand
    assert roofline.domains_spanned([(0, 8), (1, 9)], h100) == 2
    assert roofline.domains_spanned(across, roofline.CHIPS["tpu-v5p"]) == 1             # one pod


def test_weak_scaling_and_sweep_meshes():
    points = roofline.weak_scaling([{"devices": 32, "global_batch": 128, "step_s": 0.5},
                                    {"devices": 8, "global_batch": 32, "step_s": 0.4}])
    assert [p["devices"] for p in points] == [8, 32]
    assert points[0]["images_per_s"] == pytest.approx(80.0) and points[0]["efficiency"] == pytest.approx(1.0)
    assert points[1]["images_per_s"] == pytest.approx(256.0) and points[1]["efficiency"] == pytest.approx(0.8)
    mesh = {"data": 8, "fsdp": 32, "tensor": 1}
    assert roofline.sweep_mesh(mesh, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert roofline.sweep_mesh(mesh, 512) == {"data": 16, "fsdp": 32, "tensor": 1}
    assert roofline.sweep_mesh({"data": 1, "fsdp": 4, "tensor": 2}, 12) == {"data": 2, "fsdp": 3, "tensor": 2}


def test_chip_table_matches_the_cli_choices():
    assert tuple(roofline.CHIPS) == command.CHIPS
    for chip in roofline.CHIPS.values():
        assert chip.peak_flops > 1e14 and chip.hbm_bandwidth > 5e11 and chip.source


# ------------------------------------------------------------------------------------------------ report

def _program():
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    compiled = jax.jit(lambda a: a @ a).lower(x).compile()
    return CompiledProgram("train_step", compiled, {"data": 1, "fsdp": 1, "tensor": 1}, 1, 4, 4,
                           {"params": 1000, "opt_state": 2000, "ema": 0}, 0.1, 0.2)


def test_program_report_reads_cost_and_memory():
    rep = report.program_report(_program(), roofline.CHIPS["a100"], {(64, 64)})
    assert rep["cost"]["flops"] == pytest.approx(2 * 64 ** 3, rel=0.01)
    assert rep["memory"]["params"] == 1000 and rep["memory"]["arguments"] == 64 * 64 * 4
    assert rep["prediction"]["compute_s"] == pytest.approx(rep["cost"]["flops"] / 312e12)
    assert all(v["count"] == 0 for v in rep["collectives"].values())


def test_render_and_write_outputs(tmp_path):
    train = report.program_report(_program(), roofline.CHIPS["tpu-v5e"])
    train["collectives"]["all-reduce"].update(count=3, bytes=4 * 2 ** 30, wire_bytes=7 * 2 ** 30,
                                              by_what={"params": 4 * 2 ** 30})
    sweep = roofline.weak_scaling([
        {"devices": d, "mesh": {"data": d, "fsdp": 1, "tensor": 1}, "global_batch": 4 * d, "flops": 1e12,
         "collective_bytes": 2 ** 30, "step_s": 0.1 * (1 + math.log2(d) / 10), "limit": "compute",
         "peak_bytes": 2 ** 33, "compile_s": 3.0} for d in (8, 32, 128)])
    plan = {"config": "configs/x.yaml", "devices": 8, "mesh": {"data": 8, "fsdp": 1, "tensor": 1},
            "batch_per_device": 4, "chip": roofline.dataclasses.asdict(roofline.CHIPS["tpu-v5e"]),
            "platform": "cpu (8 devices)", "jax": jax.__version__, "cpu_note": report.CPU_NOTE, "elapsed_s": 12.0,
            "notes": ["unet: built-in"], "parameters": {"unet": {"count": 2e6, "bytes": 8e6, "trainable": True}},
            "train_step": train, "sweep": sweep}
    text = report.render_markdown(plan)
    assert "Predicted train step" in text and "## Weak scaling" in text
    assert "| all-reduce | 3 | 4.00 GiB | 7.00 GiB | params 4.00 GiB |" in text
    assert "| 128 | data=128,fsdp=1,tensor=1 |" in text and "XLA:CPU" in text
    paths = report.write_outputs(plan, tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![predicted images/s" in paths["markdown"].read_text()
    assert json.loads(paths["json"].read_text())["sweep"][2]["efficiency"] == pytest.approx(sweep[2]["efficiency"])


# ------------------------------------------------------------------------------------------------ CLI

def _cli(capsys, *argv):
    status = cli.main(["scaling", *argv])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--config", "missing.yaml", "--devices", "8"], "--config 'missing.yaml' does not exist"),
    (["--config", SD15], "--devices is required"),
    (["--config", SD15, "--devices", "8", "--mesh", "data=3"], "mesh"),
    (["--config", SD15, "--devices", "8", "--mesh", "data=-1,tensor=2", "--sweep", "3"], "not divisible by tensor=2"),
    (["--config", SD15, "--devices", "8", "train.nope=1"], "unknown config key 'train.nope'"),
    (["--config", SD15, "--measure", "2", "--devices", "4"], "--measure runs on all 1 device(s) of this run"),
], ids=["no-config", "no-devices", "bad-mesh", "sweep-vs-tensor", "bad-override", "measure-devices"])
def test_cli_input_errors(capsys, tmp_path, argv, message):
    status, err = _cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert status == cli.INPUT_ERROR_STATUS
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", [["--mesh", "pipeline=2"], ["--sweep", "8,x"], ["--chip", "tpu-v4"]])
def test_cli_argument_errors(capsys, tmp_path, flag):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["scaling", "--config", SD15, "--devices", "8", "--out", str(tmp_path), *flag])
    assert exit_info.value.code == 2


def test_restart_command_line_and_environment():
    parser = cli.build_parser()
    argv = ["scaling", "--config", SD15, "--devices", "256", "--mesh", "data=8,fsdp=32", "--chip", "h100",
            "--batch-per-device", "2", "--sweep", "32,8", "--no-sampling", "--out", "o", "train.lr=1e-4"]
    args = parser.parse_args(argv)
    again = parser.parse_args(command.child_argv(args))
    assert vars(again) == vars(args)
    assert args.mesh == {"data": 8, "fsdp": 32, "tensor": 1} and args.sweep == [8, 32]
    env = command.child_env(512, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo=1"})
    flags = env["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=512" in flags and "--foo=1" in flags
    assert sum(f.startswith("--xla_force_host_platform_device_count") for f in flags) == 1
    assert set(command.FAST_COMPILE_FLAGS) <= set(flags)
    assert env["JAX_PLATFORMS"] == "cpu" and env[command.CHILD_ENV] == "1"


def test_cli_restarts_itself_with_virtual_devices_and_writes_the_report(tmp_path):
    """A real ``pmf scaling`` subprocess on one CPU device plans a 4-device run: it starts itself again with 4
    virtual devices, compiles the tiny model's train step for (2, 2, 1) and a sweep point, and writes the Markdown,
    JSON and PNG report with numbers in them."""
    import os
    import subprocess
    import sys

    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps(ONE_BLOCK_UNET))
    out = tmp_path / "plan"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", command.CHILD_ENV)}
    proc = subprocess.run(
        [sys.executable, "-m", "pmf_jax.cli", "scaling", "--config", str(REPO / "configs" / "tiny_synthetic.yaml"),
         "--devices", "4", "--mesh", "data=2,fsdp=2", "--chip", "h100", "--batch-per-device", "1", "--sweep", "2,4",
         "--no-sampling", "--out", str(out), f"model.unet_config={unet}", "data.resolution=[32,32]",
         "mesh.min_shard_size=64"], capture_output=True, text=True, env=dict(env, JAX_PLATFORMS="cpu"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restarting with 4 virtual CPU devices" in proc.stderr
    plan = json.loads((out / "scaling.json").read_text())
    assert plan["devices"] == 4 and plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert plan["platform"] == "cpu (4 devices)" and plan["chip"]["name"] == "h100"
    train = plan["train_step"]
    assert train["global_batch"] == 4 and train["cost"]["flops"] > 0 and train["prediction"]["step_s"] > 0
    assert train["collectives"]["all-gather"]["count"] > 0  # fsdp=2 gathers the parameters
    assert [p["devices"] for p in plan["sweep"]] == [2, 4] and plan["sweep"][0]["efficiency"] == 1.0
    assert "images/s" in proc.stdout and (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Weak scaling" in (out / "scaling.md").read_text() and not (out / "scaling.partial.json").exists()
