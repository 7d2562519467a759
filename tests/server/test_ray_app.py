"""The Ray Serve application fails closed: Ray's proxy listens on every interface, so without
an API key file it is built only with the plain server's explicit opt-out, --insecure, by every
way of building it (`loraplex serve-ray`, `build_app`, and `app_builder` for `serve run`,
`serve deploy` and KubeRay's RayService)."""

from __future__ import annotations

import pytest

from loraplex.server.cli import main
from loraplex.server.config import ServerConfig

pytest.importorskip("ray", reason="Ray Serve is a dev dependency")


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text("")  # the app is only built here: nobody reads the keys
    return str(path)


def test_a_serve_config_without_keys_does_not_build():
    from loraplex.server.ray_serve import app_builder

    for args in ({}, {"serve_flags": []}, {"serve_flags": ["--max-loras", "4"]}):
        with pytest.raises(ValueError, match=r"without authentication.*--insecure"):
            app_builder(args)
    # Ray's proxy listens on every interface whatever --host says: loopback is no way out.
    with pytest.raises(ValueError, match="--insecure"):
        app_builder({"serve_flags": ["--host", "127.0.0.1"]})
    with pytest.raises(ValueError, match="--insecure"):
        app_builder({"insecure": False})


def test_a_serve_config_builds_with_keys_or_the_explicit_opt_out(key_file):
    from ray.serve import Application

    from loraplex.server.ray_serve import app_builder

    for args in (
        {"serve_flags": ["--auth-keys", key_file, "--allow-plaintext-keys"]},
        {"serve_flags": ["--insecure"]},  # the plain server's flag
        {"insecure": True},  # the same, as an arg of the config
    ):
        assert isinstance(app_builder(args), Application), args


@pytest.mark.parametrize("value", ["true", "false", 1, "yes"])
def test_the_opt_out_is_a_real_boolean(value):
    """A quoted "false" is truthy: anything but true or false is refused, not guessed."""
    from loraplex.server.ray_serve import app_builder

    with pytest.raises(ValueError, match="insecure must be true or false"):
        app_builder({"insecure": value})


def test_build_app_refuses_a_config_without_keys(key_file):
    from loraplex.server.ray_serve import build_app

    with pytest.raises(ValueError, match="--insecure"):
        build_app(ServerConfig())  # loopback host, no keys: fine for `serve`, not for Ray
    assert build_app(ServerConfig(insecure=True)) is not None
    assert build_app(ServerConfig(auth_keys=key_file, allow_plaintext_keys=True)) is not None


def test_keys_over_rays_plaintext_proxies_need_the_explicit_opt_in(key_file):
    """Ray's proxies serve plaintext on every interface: a key file alone is refused, as the
    plain server refuses keys over plaintext off loopback, until --allow-plaintext-keys says
    TLS ends in front of them."""
    from loraplex.server.ray_serve import app_builder, build_app

    with pytest.raises(ValueError, match="--allow-plaintext-keys"):
        build_app(ServerConfig(auth_keys=key_file))
    with pytest.raises(ValueError, match="--allow-plaintext-keys"):
        app_builder({"serve_flags": ["--auth-keys", key_file]})


def test_serve_ray_without_keys_exits_before_ray_starts(monkeypatch, capsys):
    import ray

    def init(*args, **kwargs):
        raise AssertionError("Ray started for a config it refuses")

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(SystemExit) as exit_:
        main(["serve-ray", "--no-preload"])
    assert "without authentication" in str(exit_.value) and "--insecure" in str(exit_.value)
