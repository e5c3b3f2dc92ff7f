"""Finding the Ray auth token and explaining a rejected one."""

from __future__ import annotations

import pytest

from cluster.auth import ClusterAuthError, explain_auth_failure, find_auth_token


@pytest.fixture
def home(tmp_path):
    (tmp_path / ".ray").mkdir()
    return tmp_path


def write_default(home, token="default-token"):
    (home / ".ray" / "auth_token").write_text(token + "\n")


def test_env_token_wins(home, tmp_path):
    write_default(home)
    (tmp_path / "file").write_text("file-token")
    env = {"RAY_AUTH_TOKEN": " env-token ", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}
    token = find_auth_token(local_cluster=False, env=env, home=home)
    assert (token.value, token.source) == ("env-token", "RAY_AUTH_TOKEN")
    assert token.headers() == {"Authorization": "Bearer env-token"}


def test_token_path_before_default_file(home, tmp_path):
    write_default(home)
    (tmp_path / "file").write_text("file-token\n")
    token = find_auth_token(False, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}, home)
    assert token.value == "file-token"
    assert token.source == f"RAY_AUTH_TOKEN_PATH={tmp_path / 'file'}"


def test_unreadable_or_empty_token_path_is_an_error(home, tmp_path):
    with pytest.raises(ClusterAuthError, match="cannot read the Ray auth token file"):
        find_auth_token(True, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClusterAuthError, match="is empty"):
        find_auth_token(True, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, home)


def test_default_file_only_for_local_cluster_or_token_mode(home):
    write_default(home)
    assert find_auth_token(True, {}, home).value == "default-token"
    assert find_auth_token(False, {}, home) is None  # never leaks to another machine
    token = find_auth_token(False, {"RAY_AUTH_MODE": "token"}, home)
    assert token.source == str(home / ".ray" / "auth_token")


def test_disabled_mode_sends_nothing(home):
    write_default(home)
    assert find_auth_token(True, {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}, home) is None


def test_no_token_anywhere(home):
    assert find_auth_token(True, {}, home) is None


def test_messages_say_what_to_do_and_never_show_the_token(home):
    token = find_auth_token(False, {"RAY_AUTH_TOKEN": "s3cret"}, home)
    rejected = explain_auth_failure("http://head:8265", 403, token, env={})
    assert rejected.startswith(
        "the Ray cluster at http://head:8265 rejected the auth token from RAY_AUTH_TOKEN."
    )
    assert "s3cret" not in rejected
    assert "ray get-auth-token" in rejected
    missing = explain_auth_failure("http://head:8265", 401, None, env={"RAY_AUTH_MODE": "disabled"})
    assert "no token was sent (RAY_AUTH_MODE=disabled is set in this shell)" in missing
    assert "export RAY_AUTH_TOKEN=<token>" in missing
    assert "RAY_AUTH_MODE=token" in missing  # what the plain `ray job` CLI needs
