"""The HTML report of a finished run, opened in a real headless Chromium (Debian's ``chromium``).

The run folder is written in-process by the real parts, without Ray: tasks from the sandbox's
generator, plans (the reference plan, a cut-short plan, one group failed at the world), the
sandbox rendering GIFs and mp4s, the verifiable critic scoring them, the driver's ledger rows,
and three real GRPO steps of :class:`LearnerCore` on ``tiny-random-llama`` for the learning
curve. Chromium is driven over the DevTools protocol, offline, with no sandbox and no GPU.

Install Chromium with ``scripts/ensure_chromium.sh`` (idempotent). Without it the test is
skipped, unless ``WORLDAGENT_REQUIRE_CHROMIUM=1`` (what CI sets), which makes it fail.
The screenshot goes to ``$WORLDAGENT_TEST_ARTIFACTS`` (default ``test-artifacts/``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tests.factories import make_groups
from worldagent_ray.config import load_config
from worldagent_ray.critic import Critic
from worldagent_ray.orchestration.evolve import summarize
from worldagent_ray.orchestration.report import write_report
from worldagent_ray.orchestration.run_folder import RunFolder
from worldagent_ray.rl.learner import LearnerCore
from worldagent_ray.schemas import (
    CurriculumState,
    Episode,
    EpisodeRow,
    LearnerStep,
    Plan,
)
from worldagent_ray.world.sandbox import SandboxWorld
from worldagent_ray.world.sandbox.tasks import SandboxTaskGenerator, reference_plan

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("WORLDAGENT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
    "--disable-dev-shm-usage", "--disable-extensions", "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0", "--window-size=1280,900",
]


def _chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    if os.environ.get("WORLDAGENT_REQUIRE_CHROMIUM") == "1":
        pytest.fail("Chromium is required (WORLDAGENT_REQUIRE_CHROMIUM=1): run scripts/ensure_chromium.sh")
    pytest.skip("no Chromium on PATH: run scripts/ensure_chromium.sh")


# ----------------------------------------------------------------------------- the finished run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama_path) -> RunFolder:
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("local-cpu", overrides=[f"run.root={root}", "agents.critic.scorers=[verifiable]",
                                              "agents.action.group_size=2", "learner.beta=0.04",
                                              "learner.groups_per_step=2"], environ={})
    run = RunFolder.create(cfg, "browser")
    world, critic = SandboxWorld(cfg.world.sandbox), Critic(cfg.agents.critic)
    gen = SandboxTaskGenerator(seed=3)
    tasks = [gen.sample(1, index=i).model_copy(update={"id": f"r0000.{i}.t{i}"}) for i in range(2)]
    tasks.append(gen.sample(2, index=0).model_copy(update={"id": "r0001.0.t2"}))
    run.record_round(0, tasks[:2], ["generator"] * 2)
    rows = []
    for n, task in enumerate(tasks):
        ref = reference_plan(task)
        plans = [ref, Plan.model_validate({"steps": ref.model_dump()["steps"][:1]})]  # the second stops short
        rollouts = world.render(task, plans, f"{run.videos}/{task.id}", seeds=[n, n + 10])
        verdicts = [critic.score(task, p, r) for p, r in zip(plans, rollouts)]
        eps = [Episode.new(run.run_id, task, i, plan=plans[i], rollout=rollouts[i], verdict=verdicts[i],
                           policy_version=n, round=int(task.id[1:5])) for i in range(2)]
        rows += [EpisodeRow(**e.summary().model_dump(), t=float(n)) for e in eps]
    failed_task = gen.sample(1, index=7).model_copy(update={"id": "r0001.1.t3"})
    run.record_round(1, [tasks[2], failed_task], ["generator"] * 2)
    rows += [EpisodeRow(**Episode.new(run.run_id, failed_task, i, status="failed", round=1,
                                      failure_reason="world: TimeoutError: render took longer than 600 s")
                        .summary().model_dump(), t=9.0) for i in range(2)]
    run.record_episodes(rows)
    # three real GRPO steps on the tiny policy: the learner's rows of the ledger
    core = LearnerCore(cfg.learner, tiny_llama_path)
    for s in range(3):
        m = core.step(make_groups(s, n_groups=2, group_size=2, version=core.policy_version))
        m["idle_frac"] = 0.5
        run.record_learner_steps([LearnerStep.from_metrics(m, t=float(s))])
    state = CurriculumState(phase=2)
    write_report(run, summarize(run.episode_rows(), 12.0, state))
    return run


# ----------------------------------------------------------------------------- Chromium over CDP


class DevTools:
    """A minimal Chrome DevTools Protocol client over one websocket (flattened sessions)."""

    def __init__(self, ws_url: str, timeout_s: float = 30.0):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, proxy=None, max_size=64 * 2**20, open_timeout=timeout_s)
        self.timeout_s = timeout_s
        self.events: list[dict] = []
        self._id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout_s: float | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"DevTools: no answer to {method} within {timeout_s or self.timeout_s}s")
            reply = json.loads(self.ws.recv(timeout=left))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            for e in self.events:
                if e.get("method") == method:
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"DevTools: no {method} event within {timeout_s}s")
            self.events.append(json.loads(self.ws.recv(timeout=left)))


@pytest.fixture
def browser(tmp_path):
    binary = _chromium()
    profile = tmp_path / "profile"
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "chromium.log", "w"),
                            start_new_session=True)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.exists() and len(port_file.read_text().split()) == 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"Chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}")
        time.sleep(0.1)
    port, path = port_file.read_text().split()
    cdp = DevTools(f"ws://127.0.0.1:{port}{path}")
    try:
        yield cdp
    finally:
        try:
            cdp.call("Browser.close", timeout_s=10)
        except Exception:
            pass
        cdp.ws.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


# Every image is made eager (the report lazy-loads them) and awaited, with a bound.
INSPECT = """
(async () => {
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.race([
    Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = r; i.onerror = r; }))),
    new Promise(r => setTimeout(r, 15000)),
  ]);
  const vis = el => {
    if (!el) return null;
    el.scrollIntoView();
    const b = el.getBoundingClientRect(), s = getComputedStyle(el);
    return {w: b.width, h: b.height, shown: s.display !== 'none' && s.visibility !== 'hidden' && s.opacity !== '0'};
  };
  const card = document.querySelector('.ep');
  const result = {
    images: imgs.map(i => ({src: i.getAttribute('src'), complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})),
    curve: vis(document.querySelector('#curve svg')),
    curvePoints: [...document.querySelectorAll('#curve polyline')].map(p => p.points.numberOfItems),
    learning: vis(document.querySelector('#learning')),
    learningCharts: document.querySelectorAll('#learning svg.lc').length,
    learningPoints: [...document.querySelectorAll('#learning polyline')].map(p => p.points.numberOfItems),
    card: vis(card),
    cardImageWidth: card && card.querySelector('img') ? card.querySelector('img').naturalWidth : 0,
    cards: document.querySelectorAll('.ep').length,
    videos: [...document.querySelectorAll('a.video')].map(a => a.href),
    config: document.querySelector('#config pre') ? document.querySelector('#config pre').textContent : null,
    failed: document.querySelectorAll('.b.fail').length,
  };
  window.scrollTo(0, 0);
  return result;
})()
"""


def test_report_renders_in_chromium(finished_run, browser):
    report = finished_run.local / "report.html"
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        browser.call(f"{domain}.enable", session=session)
    browser.call("Emulation.setDeviceMetricsOverride",
                 {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
    browser.call("Page.navigate", {"url": report.resolve().as_uri()}, session=session)
    browser.wait_event("Page.loadEventFired", timeout_s=30)
    got = browser.call("Runtime.evaluate", {"expression": INSPECT, "awaitPromise": True, "returnByValue": True},
                       session=session, timeout_s=45)
    assert "exceptionDetails" not in got, got
    dom = got["result"]["value"]

    # the screenshot is an artefact of the test (full page, capped at 6000 px)
    size = browser.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
    shot = browser.call("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1}},
        session=session, timeout_s=45)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS / "report_chromium.png"
    png.write_bytes(base64.b64decode(shot["data"]))

    errors = [e for e in browser.events if (
        (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"))]
    assert errors == [], json.dumps(errors, indent=1)[:3000]

    # every image and GIF loads: 4 scored groups of 2 have a GIF each; the failed group has none
    assert len(dom["images"]) == 6, dom["images"]
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in dom["images"]), dom["images"]
    assert all(i["src"].endswith(".gif") for i in dom["images"])
    assert dom["curve"]["shown"] and dom["curve"]["w"] > 300 and dom["curve"]["h"] > 100
    assert dom["curvePoints"] == [6, 6]  # reward and success, one point per scored episode
    assert dom["card"]["shown"] and dom["card"]["w"] > 100 and dom["card"]["h"] > 50
    assert dom["cards"] == 8 and dom["failed"] == 2 and dom["cardImageWidth"] == 0  # newest first: failed
    # the learning curve: loss, reward, version, KL, grad norm, staleness over 3 steps
    assert dom["learning"]["shown"] and dom["learningCharts"] == 6 and set(dom["learningPoints"]) == {3}
    # each scored episode links its mp4, and the file is there
    assert len(dom["videos"]) == 6
    for href in dom["videos"]:
        p = Path(unquote(urlparse(href).path))
        assert p.suffix == ".mp4" and p.stat().st_size > 0, href
    assert dom["config"] and "profile: local-cpu" in dom["config"] and "beta: 0.04" in dom["config"]

    from PIL import Image

    img = Image.open(io.BytesIO(png.read_bytes())).convert("L")
    assert img.width == int(size["width"]) > 1200 and img.height > 900  # the page less its scrollbar
    assert img.getextrema()[0] < 100, "the screenshot is blank"
