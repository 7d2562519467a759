"""The client's upload stream: what `loraplex adapters push` sends of a directory."""

from __future__ import annotations

from pathlib import Path

from loraplex.server.client import push_requests
from tests.adapters.test_validate import SIDE_FILES, write_adapter, write_side_files


def test_a_push_sends_only_what_the_server_reads_and_names_the_rest(tmp_path, opened):
    """Tokenizer files, optimizer state and checkpoints are neither read nor sent: the server
    ignores them, and hears their names so that it can say so (and refuse pickled weights)."""
    directory = write_side_files(write_adapter(tmp_path / "adapter"))
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04")
    opened.clear()
    first, *pieces = push_requests("trained", directory)
    assert first.adapter_id == "trained" and not first.file_name
    sent = {p.file_name for p in pieces if p.data}
    assert sent == {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"}
    named = {p.file_name for p in pieces if not p.data}
    assert named >= {*SIDE_FILES, "checkpoint-10/", "events.fifo", "adapter_model.bin"}
    assert "caf\\xe9.txt" in named  # not UTF-8: escaped
    assert {Path(p).name for p in opened} == sent
