"""Screenshots of the chat page (light and dark) for the docs, taken in headless Chromium against a running server.

    python -m mlc_llm serve artifacts/SmolLM2-135M-Instruct-q4f32_cpu --served-model-name SmolLM2-135M-Instruct &
    .venv/bin/python scripts/ui_screenshots.py http://127.0.0.1:8000/ docs/images
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("out", type=Path)
    ap.add_argument("--api-key", default=os.environ.get("MLC_LLM_API_KEY"))
    ap.add_argument("--chromium", default=os.environ.get("MLC_LLM_CHROMIUM") or shutil.which("chromium"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(a.url)
        stored = {"settings": {"system": "You are a helpful assistant.", "temperature": "0", "max_tokens": "160",
                               "mode": "text"}, "theme": "light"}
        if a.api_key:
            stored["apiKey"] = a.api_key
        page.evaluate("s => { localStorage.clear(); for (const [k, v] of Object.entries(s))"
                      " localStorage.setItem('mlc_llm.' + k, JSON.stringify(v)); }", stored)
        page.reload()
        page.wait_for_selector("#model-ctx:has-text('context')", timeout=60_000)
        for q in QUESTIONS:
            page.fill("#prompt", q)
            page.press("#prompt", "Enter")
            page.wait_for_selector("#send:visible", timeout=120_000)
        page.click("#toggle-settings")
        page.screenshot(path=str(a.out / "chat-light.png"))
        page.click("#theme")
        page.screenshot(path=str(a.out / "chat-dark.png"))
        browser.close()
    print(f"wrote {a.out / 'chat-light.png'} and {a.out / 'chat-dark.png'}")


if __name__ == "__main__":
    main()
