"""End to end in a real headless Chromium (Debian's ``chromium``, driven by
Playwright with the system browser; nothing is downloaded): ``crossfind serve``
on a generated library, a typed query, thumbnails that load, "more like this",
an uploaded image, text results and the keyboard; the duplicates view with a
resized copy and a byte-identical copy grouped around the original.

Set CROSSFIND_SCREENSHOT=FILE to save a screenshot of the page with results,
CROSSFIND_SCREENSHOT_DUPLICATES=FILE one of the duplicates view.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="crossfind serve needs the 'serve' extra (pip install -e '.[dev]')")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install -e '.[dev]')")

from test_serve_cli import start_server, stop_server  # noqa: E402

from retrieval import Engine  # noqa: E402
from retrieval.shapes import generate  # noqa: E402

BROWSER = os.environ.get("CROSSFIND_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (apt-get install chromium)")


@pytest.fixture(scope="module")
def shapes_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    scenes = root / "scenes"
    records = generate(scenes, 48, seed=5)
    corpus = root / "captions.jsonl"
    corpus.write_text("".join(json.dumps({"text": r["caption"], "id": r["image"]}) + "\n" for r in records))
    lib = root / "lib"
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.index_folder(scenes)
        eng.add_texts(corpus, corpus="captions")
    proc, url = start_server(lib)
    try:
        yield url, scenes, records
    finally:
        stop_server(proc)


def loaded_thumbnails(page) -> int:
    return page.evaluate("[...document.querySelectorAll('.card img')].filter(i => i.complete && i.naturalWidth > 0).length")


def test_search_page_in_chromium(shapes_server):
    from playwright.sync_api import sync_playwright

    url, scenes, records = shapes_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#counts:has-text('48 images')")

            # A typed query: thumbnails load, with scores and match probabilities.
            page.keyboard.press("/")
            assert page.evaluate("document.activeElement.id") == "q"
            want = records[0]
            page.fill("#q", want["caption"])
            page.keyboard.press("Enter")
            page.wait_for_selector(".card img")
            page.wait_for_function("[...document.querySelectorAll('.card img')].slice(0, 6).every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator(".card").count() == 30 and loaded_thumbnails(page) >= 6
            top = [page.locator(".card img").nth(i).get_attribute("alt") for i in range(3)]
            assert str(scenes / want["image"]) in top
            assert "%" in page.locator(".card .prob").first.inner_text()
            page.click("#more")
            page.wait_for_function("document.querySelectorAll('.card').length === 48")
            if os.environ.get("CROSSFIND_SCREENSHOT"):
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=os.environ["CROSSFIND_SCREENSHOT"])

            # Arrows move, Enter opens the detail view; "more like this" searches by that image.
            page.keyboard.press("ArrowDown")  # leave the search box
            page.locator("body").click(position={"x": 5, "y": 790})
            page.keyboard.press("ArrowRight")
            page.keyboard.press("Enter")
            page.wait_for_selector("#detail:not([hidden])")
            page.wait_for_selector("#d-caps li")
            shown = page.locator("#d-path").inner_text()
            assert shown.startswith(str(scenes)) and page.locator("#d-caps li").count() == 3
            page.click("#d-like")
            page.wait_for_selector("#detail", state="hidden")
            page.wait_for_function("document.querySelector('#summary').textContent.includes('for image')")
            page.wait_for_selector(".card img")
            like = [page.locator(".card img").nth(i).get_attribute("alt") for i in range(5)]
            assert shown not in like  # the query image itself is left out
            assert page.locator(".term").first.inner_text().startswith("image:")

            # An uploaded image: its own scene comes first, and the library does not grow.
            page.locator(".term button").first.click()
            page.set_input_files("#file", str(scenes / records[7]["image"]))
            page.wait_for_function("document.querySelector('#summary').textContent.includes('for image')")
            page.wait_for_function(f"document.querySelector('.card img') && document.querySelector('.card img').alt.endsWith('{records[7]['image']}')")
            page.reload()
            page.wait_for_selector("#counts:has-text('48 images')")

            # Texts as a list with scores.
            page.fill("#q", records[3]["caption"])
            page.check("input[name=target][value=texts]")
            page.wait_for_selector("#texts li")
            assert page.locator("#texts li").count() == 30 and page.locator("#texts .score").count() == 30
            assert page.locator("#recent li").count() >= 1
            assert not errors, errors
        finally:
            browser.close()


@pytest.fixture(scope="module")
def dups_server(tmp_path_factory):
    """12 shapes scenes, a resized JPEG re-encode of scene 0 and a byte copy of it (newer, so not the keeper)."""
    root = tmp_path_factory.mktemp("browser-dups")
    scenes = root / "scenes"
    records = generate(scenes, 12, seed=11)
    original = scenes / records[0]["image"]
    copies = root / "copies"
    copies.mkdir()
    with Image.open(original) as im:
        im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.LANCZOS).save(
            copies / "small.jpg", quality=70)
    shutil.copyfile(original, copies / "same.png")
    later = original.stat().st_mtime + 60
    os.utime(copies / "same.png", (later, later))
    lib = root / "lib"
    with Engine.open(lib, model="shapes-tiny") as eng:
        eng.index_folder(scenes)
        eng.index_folder(copies)
    proc, url = start_server(lib)
    try:
        yield url, original, copies
    finally:
        stop_server(proc)


def test_duplicates_view_in_chromium(dups_server):
    from playwright.sync_api import sync_playwright

    url, original, copies = dups_server
    small, same = str(copies / "small.jpg"), str(copies / "same.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=ARGS)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 800}, accept_downloads=True)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#counts:has-text('14 images')")
            page.click("#tab-dups")
            assert page.locator("#dups-view").is_visible() and not page.locator("#search-view").is_visible()
            assert "never deletes" in page.locator("#dups-view .never").inner_text()
            page.wait_for_selector(".dgroup")
            group = page.locator(".dgroup", has=page.locator(f'img[alt="{small}"]'))
            assert group.count() == 1 and page.locator("#dups-more").is_hidden()
            page.wait_for_function("[...document.querySelectorAll('.dgroup img')].every(i => i.complete && i.naturalWidth > 0)")
            alts = [group.locator("img").nth(i).get_attribute("alt") for i in range(group.locator("img").count())]
            assert sorted(alts) == sorted([str(original), small, same])
            # The keeper (the original: most pixels, then oldest) comes first and is marked keep; the copies skip.
            keeper = group.locator(".ditem.keeper")
            assert keeper.count() == 1 and keeper.locator("img").get_attribute("alt") == str(original)
            assert "suggested keep" in keeper.inner_text() and "keep" in (keeper.get_attribute("class") or "").split()
            assert group.locator(".ditem").first.locator("img").get_attribute("alt") == str(original)
            copy_card = group.locator(".ditem", has=page.locator(f'img[alt="{same}"]'))
            assert "exact copy" in copy_card.inner_text() and "skip" in (copy_card.get_attribute("class") or "").split()
            small_card = group.locator(".ditem", has=page.locator(f'img[alt="{small}"]'))
            assert "similarity" in small_card.inner_text() and "×" in small_card.inner_text()
            assert set(page.input_value("#dups-skipped").splitlines()) >= {small, same}
            assert str(original) not in page.input_value("#dups-skipped").splitlines()
            if os.environ.get("CROSSFIND_SCREENSHOT_DUPLICATES"):
                page.screenshot(path=os.environ["CROSSFIND_SCREENSHOT_DUPLICATES"])

            # A mark the user toggles changes the skipped list and survives a reload (kept in the browser).
            small_card.locator(".m-keep").click()
            assert "keep" in (small_card.get_attribute("class") or "").split()
            assert small not in page.input_value("#dups-skipped").splitlines()
            page.reload()
            page.wait_for_selector(".dgroup")  # the #duplicates address opens the view again
            small_card = page.locator(".ditem", has=page.locator(f'img[alt="{small}"]'))
            assert "keep" in (small_card.get_attribute("class") or "").split()
            assert same in page.input_value("#dups-skipped").splitlines()
            assert small not in page.input_value("#dups-skipped").splitlines()

            # The list leaves the browser as JSON with every mark; nothing is deleted.
            with page.expect_download() as info:
                page.click("#dups-download")
            saved = json.loads(Path(info.value.path()).read_text())
            assert same in saved["skipped"] and small not in saved["skipped"]
            marks = {it["path"]: it["mark"] for g in saved["groups"] for it in g["items"]}
            assert marks[str(original)] == "keep" and marks[small] == "keep" and marks[same] == "skip"
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
            page.click("#dups-copy")
            page.wait_for_selector("#dups-count:has-text('copied 1 path')")
            assert page.evaluate("navigator.clipboard.readText()").splitlines() == [same]
            page.click("#dups-reset")
            assert small in page.input_value("#dups-skipped").splitlines()
            assert original.exists() and Path(small).exists() and Path(same).exists()
            page.click("#tab-search")
            assert page.locator("#search-view").is_visible() and not page.locator("#dups-view").is_visible()
            assert not errors, errors
        finally:
            browser.close()
