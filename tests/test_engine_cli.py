"""``cachesvc engine serve``: registered, and its options checked before anything loads."""

from __future__ import annotations

from typer.testing import CliRunner

from cachesvc.cli import app


class TestEngineCli:
    def test_engine_serve_is_registered_with_its_options(self):
        out = CliRunner().invoke(app, ["engine", "serve", "--help"])
        assert out.exit_code == 0
        for opt in ("--port", "--host", "--model", "--pool-mb", "--api-key",
                    "--no-isolate-tenants"):
            assert opt in out.output

    def test_a_malformed_api_key_is_refused_naming_the_form(self):
        out = CliRunner().invoke(app,
                                 ["engine", "serve", "--model", "random-tiny", "--api-key",
                                  "nokey"])
        assert out.exit_code != 0 and "KEY=TENANT" in out.output

    def test_an_unknown_model_is_refused_with_the_choices(self):
        out = CliRunner().invoke(app, ["engine", "serve", "--model", "gpt-9"])
        assert out.exit_code != 0 and "random-tiny" in out.output
