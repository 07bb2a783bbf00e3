"""Headless Chromium and free ports for the UI tests (flags from shared/docs/environment.md)."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kfac_tune.launch import free_port


def has_chromium() -> bool:
    return shutil.which("chromium") is not None or shutil.which("chromium-browser") is not None


def chromium(url: str, screenshot: Path) -> str:
    """Render ``url`` in headless Chromium: save a screenshot and return the rendered DOM."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary is not None
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        result = subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1600,1000", "--virtual-time-budget=15000",
             f"--screenshot={screenshot}", "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def visible_text(dom: str) -> str:
    """The page's text, without scripts, styles and markup."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


