"""Debian's headless Chromium driven by Playwright, for the tests of pages; skips with the reason when either is
missing (launch/test.sh installs chromium as root; Playwright never downloads a browser of its own)."""
import contextlib
import os

import pytest

CHROMIUM = '/usr/bin/chromium'
# Nothing in the background (component updates, safe-browsing lists) may reach the network while a test
# records every request a page makes.
ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
        '--no-first-run']


@contextlib.contextmanager
def chromium():
  """A launched headless Chromium (a Playwright Browser), closed on exit; pytest.skip when it cannot be had."""
  sync_api = pytest.importorskip('playwright.sync_api', reason='needs playwright (the [test] extra)')
  if not os.path.exists(CHROMIUM):
    pytest.skip(f'no {CHROMIUM}: launch/test.sh installs it (apt-get install chromium, as root)')
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    try:
      yield browser
    finally:
      browser.close()
