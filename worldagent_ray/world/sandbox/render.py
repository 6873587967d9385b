"""Draw the kitchen as frames: a top-down layout with coloured shapes, no text.

Fixtures (fridge, counter, stove, sink, table) are boxes at fixed places; a portable object
is drawn on a slot of the fixture it is at, on top of the container it is in, or at the hand
(top right) when held. Appearance comes from the rules' ``render`` section: colour and shape
change with the object's state (a burner glows red when the stove is on, an egg turns yellow
when cracked). Between two states an object slides from its old place to its new one over
the frames of the step. A status bar at the bottom shows one cell per plan step, coloured by
its outcome. Everything is a pure function of (state, seed): same inputs, same pixels.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from .rules import Rules
from .state import HAND, KitchenState


def _seed_jitter(seed: int, name: str, scale: float) -> tuple[float, float]:
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return ((h[0] / 255.0 - 0.5) * scale, (h[1] / 255.0 - 0.5) * scale)


class KitchenRenderer:
    """Renders :class:`KitchenState` objects to ``(S, S, 3)`` uint8 frames."""

    def __init__(self, rules: Rules, image_size: int, seed: int = 0):
        self.rules = rules
        self.spec: dict[str, Any] = rules.render
        self.size = int(image_size)
        self.seed = int(seed)
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s]
        self._xx = xx.astype(np.float32) + 0.5
        self._yy = yy.astype(np.float32) + 0.5
        self._base = self._background()

    # ------------------------------------------------------------------ layout

    def positions(self, state: KitchenState) -> dict[str, tuple[float, float]]:
        """Pixel centre of every portable object in ``state``."""
        fx = self.spec["fixtures"]
        s = self.size
        out: dict[str, tuple[float, float]] = {}
        placed: dict[str, int] = {}

        def slot(fixture: str, k: int) -> tuple[float, float]:
            x0, y0, x1, y1 = fx[fixture]["box"]
            cols, rows = fx[fixture].get("slots", [1, 1])
            n = cols * rows
            c, r = (k % n) % cols, (k % n) // cols
            layer = k // n
            x = x0 + (x1 - x0) * (c + 0.5) / cols + 0.02 * layer
            y = y0 + (y1 - y0) * (r + 0.5) / rows + 0.02 * layer
            return x * s, y * s

        def pos(name: str, depth: int = 0) -> tuple[float, float]:
            if name in out:
                return out[name]
            loc = state.loc(name)
            if loc == HAND:
                hx, hy = self.spec["hand"]["pos"]
                p = (hx * s, hy * s)
            elif loc is None or depth > 8:
                p = (s / 2, s / 2)
            elif loc in fx:
                k = placed.get(loc, 0)
                placed[loc] = k + 1
                p = slot(loc, k)
            else:  # inside / on a portable object
                px, py = pos(loc, depth + 1)
                k = placed.get(loc, 0)
                placed[loc] = k + 1
                off = 0.018 * s
                p = (px + off * (k % 2) - off / 2, py + off * (k // 2) - off / 2)
            jx, jy = _seed_jitter(self.seed, name, 0.01 * s)
            out[name] = (p[0] + jx, p[1] + jy)
            return out[name]

        for name in state.objects:
            if state.loc(name) is not None:
                pos(name)
        return out

    # ------------------------------------------------------------------ drawing

    def _rect(self, img: np.ndarray, box: tuple[float, float, float, float], color) -> None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        img[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = color

    def _mask(self, shape: str, cx: float, cy: float, r: float) -> np.ndarray:
        dx, dy = self._xx - cx, self._yy - cy
        if shape == "disc":
            return dx * dx + dy * dy <= r * r
        if shape == "ring":
            d2 = dx * dx + dy * dy
            return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
        if shape == "ellipse":
            return (dx / (0.75 * r)) ** 2 + (dy / r) ** 2 <= 1.0
        if shape == "rect":
            return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= r)
        if shape == "bar":
            return (np.abs(dx) <= r) & (np.abs(dy) <= 0.22 * r)
        if shape == "pieces":
            m = np.zeros_like(dx, dtype=bool)
            for ox, oy in ((-0.6, -0.3), (0.6, -0.3), (0.0, 0.55)):
                ex, ey = dx - ox * r, dy - oy * r
                m |= ex * ex + ey * ey <= (0.45 * r) ** 2
            return m
        return dx * dx + dy * dy <= r * r

    def _appearance(self, spec: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
        look = {k: v for k, v in spec.items() if k != "states"}
        for st in spec.get("states", []):
            if all(props.get(k) == v for k, v in st["when"].items()):
                look.update({k: v for k, v in st.items() if k != "when"})
                break
        return look

    def _background(self) -> np.ndarray:
        s = self.size
        img = np.empty((s, s, 3), np.uint8)
        img[:] = self.spec.get("background", [60, 60, 60])
        img[: int(0.16 * s)] = self.spec.get("wall", [90, 90, 90])
        return img

    def _draw_fixtures(self, img: np.ndarray, state: KitchenState) -> None:
        s = self.size
        for name, f in self.spec["fixtures"].items():
            if name not in state.objects:
                continue
            look = self._appearance(f, state.objects[name]["props"])
            x0, y0, x1, y1 = (v * s for v in look["box"])
            self._rect(img, (x0, y0, x1, y1), look["color"])
            if "interior" in look:
                self._rect(img, (x0 + 2, y0 + 2, x1 - 2, y1 - 2), look["interior"])
            if "burner" in look:
                m = self._mask("disc", (x0 + x1) / 2, (y0 + y1) / 2, 0.35 * min(x1 - x0, y1 - y0))
                img[m] = look["burner"]

    def _draw_hand(self, img: np.ndarray) -> None:
        h = self.spec["hand"]
        m = self._mask("ring", h["pos"][0] * self.size, h["pos"][1] * self.size, h["radius"] * self.size)
        img[m] = h["color"]

    def _draw_objects(
        self, img: np.ndarray, state: KitchenState, pos: dict[str, tuple[float, float]]
    ) -> None:
        objs = self.spec["objects"]

        def depth(n: str) -> int:
            return len(state.ancestors(n)) + (10 if state.loc(n) == HAND else 0)

        for name in sorted(pos, key=lambda n: (depth(n), n)):
            if name not in objs:
                continue
            look = self._appearance(objs[name], state.objects[name]["props"])
            cx, cy = pos[name]
            r = look["size"] * self.size
            img[self._mask(look["shape"], cx, cy, r)] = look["color"]
            if look.get("steam"):
                for k in range(3):
                    m = self._mask("disc", cx - r + k * r, cy - 1.6 * r, 0.18 * r + 1)
                    img[m] = (250, 250, 250)

    def _draw_status(self, img: np.ndarray, cells: list[str], current: int | None) -> None:
        sb = self.spec["status_bar"]
        s = self.size
        h = max(2, int(sb["height"] * s))
        img[s - h :] = (20, 20, 20)
        if not cells:
            return
        w = s / len(cells)
        for i, status in enumerate(cells):
            x0, x1 = int(i * w) + (1 if w >= 3 else 0), int((i + 1) * w)
            y0 = s - h + (0 if i == current else 1)
            img[y0:s, x0:max(x1, x0 + 1)] = sb["colors"].get(status, (80, 80, 80))

    def frame(
        self,
        state: KitchenState,
        pos: dict[str, tuple[float, float]] | None = None,
        cells: list[str] | None = None,
        current: int | None = None,
    ) -> np.ndarray:
        img = self._base.copy()
        self._draw_fixtures(img, state)
        self._draw_hand(img)
        self._draw_objects(img, state, pos if pos is not None else self.positions(state))
        self._draw_status(img, cells or [], current)
        return img

    def scene(self, state: KitchenState, height: int | None = None, width: int | None = None) -> np.ndarray:
        """A still of ``state`` without the status bar (a task's reference image). With
        ``height``/``width``, the square scene is drawn ``min(height, width)`` pixels wide
        (from a renderer of that size) and letterboxed into ``(height, width)`` with the
        background colour, so a pipeline that resizes to that shape keeps its proportions."""
        h, w = height or self.size, width or self.size
        side = min(h, w)
        r = self if side == self.size else KitchenRenderer(self.rules, side, self.seed)
        img = r._base.copy()
        r._draw_fixtures(img, state)
        r._draw_hand(img)
        r._draw_objects(img, state, r.positions(state))
        if (h, w) == (side, side):
            return img
        out = np.empty((h, w, 3), np.uint8)
        out[:] = self.spec.get("background", [60, 60, 60])
        y0, x0 = (h - side) // 2, (w - side) // 2
        out[y0 : y0 + side, x0 : x0 + side] = img
        return out

    def transition(
        self,
        before: KitchenState,
        after: KitchenState,
        frames: int,
        cells: list[str],
        current: int,
    ) -> list[np.ndarray]:
        """``frames`` frames moving objects from their place in ``before`` to ``after``
        (smoothstep), showing the new appearance from the middle of the step on."""
        p0, p1 = self.positions(before), self.positions(after)
        out = []
        for k in range(1, frames + 1):
            t = k / frames
            a = t * t * (3 - 2 * t)
            pos = {}
            for n in p1:
                x0, y0 = p0.get(n, p1[n])
                x1, y1 = p1[n]
                pos[n] = (x0 + (x1 - x0) * a, y0 + (y1 - y0) * a)
            shown = after if t >= 0.5 else before
            out.append(self.frame(shown, {n: pos[n] for n in pos if n in shown.objects}, cells, current))
        return out
