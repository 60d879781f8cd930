"""pmf_jax.runtime: what entry points set up, and which CLI commands turn the persistent compilation cache on."""

import jax
import pytest

from pmf_jax import runtime
from pmf_jax.cli import build_parser
from pmf_jax.commands import options
from pmf_jax.errors import PMFInputError


def _cache(argv):
    return options.compilation_cache(build_parser().parse_args(argv))


def test_cli_commands_choose_the_compilation_cache():
    base = ["--model", "m", "--source", "s.png", "--pose", "p.png", "--out", "o"]
    assert _cache(["retarget", *base]) is None                                # the default folder
    assert _cache(["retarget", *base, "--cache-dir", "/c"]) == "/c"
    assert _cache(["retarget", *base, "--no-cache"]) is False
    assert _cache(["enhance", "--model", "m", "--image", "i.png", "--instruction", "x", "--out", "o.png"]) is None
    assert _cache(["eval", "generate", "--out", "o"]) is None
    assert _cache(["eval", "score", "--generated", "g"]) is False             # compiles no sampling programs
    assert _cache(["scaling", "--config", "c.yaml", "--out", "o"]) is False   # planning leaves the setting alone


def test_enable_compilation_cache(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert runtime.setup(compilation_cache=False) is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "env"))
        assert runtime.enable_compilation_cache() == tmp_path / "env" and (tmp_path / "env").is_dir()
        assert runtime.enable_compilation_cache(tmp_path / "other") == tmp_path / "env"  # a configured one is kept
        jax.config.update("jax_compilation_cache_dir", None)
        assert runtime.setup(tmp_path / "given") == tmp_path / "given"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given")
        (tmp_path / "file").write_text("")
        jax.config.update("jax_compilation_cache_dir", None)
        with pytest.raises(PMFInputError, match="cannot create the compilation cache folder"):
            runtime.enable_compilation_cache(tmp_path / "file" / "sub")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
