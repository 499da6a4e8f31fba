"""
The FID Inception weights download (inception.find_weights): from a file
served over http://127.0.0.1, checked against its sha256, cached in torch
hub's checkpoint folder and fetched once; refused on a wrong checksum and,
offline, the error that says which file to put where.
"""

import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest
import torch

from improved_diffusion import inception
from improved_diffusion.eval_errors import EvaluationError

PAYLOAD = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 17, dtype=np.uint8).tobytes()
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(autouse=True)
def online_hub(monkeypatch, tmp_path):
    """An empty torch hub folder, and downloads allowed (the suite turns them off in conftest)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(inception.OFFLINE_VARIABLE, raising=False)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 serving PAYLOAD at /weights.pth; `requests` lists the paths asked for."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.requests = requests
    httpd.url = f"http://127.0.0.1:{httpd.server_port}/weights.pth"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_the_weights_are_downloaded_once_into_the_hub_cache(server, online_hub, capfd):
    path = inception.find_weights("", url=server.url, sha256_prefix=PAYLOAD_SHA256[:8])
    assert path == str(online_hub / inception.WEIGHTS_FILENAME) == inception.default_weights_paths()[0]
    assert (online_hub / inception.WEIGHTS_FILENAME).read_bytes() == PAYLOAD
    assert sorted(p.name for p in online_hub.iterdir()) == [inception.WEIGHTS_FILENAME]  # no temporary left
    assert "downloading weights.pth" in capfd.readouterr().err  # the progress bar
    assert inception.find_weights("", url=server.url, sha256_prefix=PAYLOAD_SHA256[:8]) == path
    assert server.requests == ["/weights.pth"]  # the second call found the cached file


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(server, online_hub):
    wrong = "0" * 8 if not PAYLOAD_SHA256.startswith("0" * 8) else "f" * 8
    with pytest.raises(EvaluationError) as error:
        inception.find_weights("", url=server.url, sha256_prefix=wrong)
    message = str(error.value)
    assert f"has sha256 {PAYLOAD_SHA256}, which does not start with {wrong}" in message
    assert str(online_hub / inception.WEIGHTS_FILENAME) in message
    assert server.requests == ["/weights.pth"] and list(online_hub.iterdir()) == []


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/weights.pth"  # nothing listens once it is closed


def assert_says_which_file_to_put_where(message, url, hub):
    assert inception.WEIGHTS_FILENAME in message and url in message
    assert str(hub / inception.WEIGHTS_FILENAME) in message and "--inception_weights PATH" in message


def test_offline_the_error_says_which_file_to_put_where(online_hub):
    url = closed_port_url()
    with pytest.raises(EvaluationError) as error:
        inception.find_weights("", url=url)
    assert_says_which_file_to_put_where(str(error.value), url, online_hub)
    assert "Connection refused" in str(error.value)
    assert list(online_hub.iterdir()) == []


def test_a_silent_server_times_out_with_the_same_error(online_hub):
    with socket.socket() as listener:  # accepts connections (the backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/weights.pth"
        with pytest.raises(EvaluationError) as error:
            inception.find_weights("", url=url, timeout=0.2)
    assert_says_which_file_to_put_where(str(error.value), url, online_hub)
    assert "timed out" in str(error.value)
    assert list(online_hub.iterdir()) == []


def test_the_offline_variable_turns_downloads_off(server, online_hub, monkeypatch):
    monkeypatch.setenv(inception.OFFLINE_VARIABLE, "1")
    with pytest.raises(EvaluationError, match=f"{inception.OFFLINE_VARIABLE} is set") as error:
        inception.find_weights("", url=server.url, sha256_prefix=PAYLOAD_SHA256[:8])
    assert_says_which_file_to_put_where(str(error.value), server.url, online_hub)
    assert server.requests == []
