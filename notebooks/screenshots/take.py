"""Screenshots of the exported notebooks, with headless Chromium (Debian's `chromium` package).

    python notebooks/screenshots/take.py            # export all three, then screenshot them
    python notebooks/screenshots/take.py --no-export screen   # reuse notebooks/screenshots/screen.html

An exported marimo HTML file loads its frontend from a CDN; this script serves the copy that
ships inside the marimo wheel from localhost instead, so it works offline.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import marimo
from PIL import Image, ImageChops

HERE = Path(__file__).resolve().parent
NOTEBOOKS = HERE.parent
STATIC = Path(marimo.__file__).parent / "_static"
CDN = f"https://cdn.jsdelivr.net/npm/@marimo-team/frontend@{marimo.__version__}/dist/"


def export(name: str, html: Path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    with tempfile.TemporaryDirectory() as tmp:  # train.py saves its model into the working directory
        subprocess.run(["marimo", "export", "html", str(NOTEBOOKS / f"{name}.py"), "-o", str(html), "-f",
                        "--no-include-code"], check=True, env=env, cwd=tmp)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def shoot(html: Path, png: Path, *, width: int = 1200, height: int = 5200) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "dist").symlink_to(STATIC)
        handler = functools.partial(_Quiet, directory=str(root))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        (root / "page.html").write_text(html.read_text().replace(CDN, f"http://127.0.0.1:{port}/dist/"))
        raw = root / "raw.png"
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            sys.exit("chromium is not installed: apt-get install chromium")
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", "--virtual-time-budget=20000",
                        f"--screenshot={raw}", f"http://127.0.0.1:{port}/page.html"],
                       check=True, capture_output=True, timeout=180)
        server.shutdown()
        img = Image.open(raw).convert("RGB")
        # trim the empty space below the last cell
        bg = Image.new("RGB", img.size, img.getpixel((5, img.height - 5)))
        box = ImageChops.difference(img, bg).crop((0, 0, img.width, img.height - 90)).getbbox()  # not the badge
        if box:
            img = img.crop((0, 0, img.width, min(img.height, box[3] + 24)))
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.LANCZOS)
        img.quantize(colors=128).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["screen", "compare", "train"])
    parser.add_argument("--no-export", action="store_true", help="reuse notebooks/screenshots/NAME.html")
    args = parser.parse_args()
    for name in args.names:
        html = HERE / f"{name}.html"
        if not args.no_export:
            export(name, html)
        shoot(html, HERE / f"{name}.png")
        print(f"wrote {HERE / name}.png ({(HERE / f'{name}.png').stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
