"""ui.render: overlays, boxes, thumbnails and the probability chart (plain arrays, no browser)."""

from __future__ import annotations

import numpy as np
import pytest

from ui import render as rd


def _gray(h: int = 64, w: int = 80) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def test_to_rgb_shapes_and_dtype():
    assert rd.to_rgb(_gray()).shape == (64, 80, 3)
    rgba = np.zeros((4, 5, 4), np.uint8)
    assert rd.to_rgb(rgba).shape == (4, 5, 3)
    with pytest.raises(ValueError):
        rd.to_rgb(np.zeros((4, 5), np.float32))


def test_colormap_ends_and_monotone_brightness():
    c = rd.colormap(np.linspace(0, 1, 11)).astype(int)
    assert c.shape == (11, 3) and c.dtype == np.int64
    assert tuple(rd.colormap(np.array(0.0))) == (0, 0, 4)
    assert c.sum(axis=1)[-1] > c.sum(axis=1)[0]
    assert np.all(np.diff(c.sum(axis=1)) >= 0)
    assert tuple(rd.colormap(np.array([np.nan, 2.0]))[1]) == tuple(rd.colormap(np.array(1.0)))


def test_overlay_leaves_cold_pixels_and_tints_hot_ones():
    base = np.full((32, 32), 100, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[8:16, 8:16] = 1.0
    out = rd.overlay_heatmap(base, heat, opacity=0.5, colour=(255, 0, 0))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (100, 100, 100)  # below the floor: untouched
    assert tuple(out[10, 10]) == (178, 50, 50)  # half-way to red
    assert np.array_equal(rd.overlay_heatmap(base, heat, opacity=0.0), rd.to_rgb(base))


def test_overlay_resizes_a_heatmap_to_the_image():
    out = rd.overlay_heatmap(_gray(64, 80), np.ones((8, 10), np.float32), opacity=1.0)
    assert out.shape == (64, 80, 3)
    assert np.array_equal(out[0, 0], rd.colormap(np.array(1.0)))


def test_boxes_draw_outline_in_their_colour_and_keep_input():
    img = np.zeros((100, 100), np.uint8)
    out = rd.draw_boxes(img, [(20, 30, 60, 70)], ["effusion"], [(0, 255, 0)], width=2)
    assert img.max() == 0  # input untouched
    assert tuple(out[50, 20]) == (0, 255, 0)  # left edge
    assert tuple(out[50, 40]) == (0, 0, 0)  # inside stays clear
    assert (out[:30, 20:60] > 0).any()  # the label above the box


def test_one_colour_per_phrase_cycles():
    assert rd.colour_for(0) != rd.colour_for(1)
    assert rd.colour_for(len(rd.PALETTE)) == rd.colour_for(0)


def test_thumbnail_and_resize_long_side():
    t = rd.thumbnail(_gray(50, 100), size=64)
    assert t.shape == (64, 64, 3)
    assert tuple(t[0, 0]) == rd.VIEWER_BG  # letterbox bars
    assert rd.resize_long_side(_gray(50, 100), 200).shape == (100, 200, 3)
    assert rd.resize_long_side(_gray(400, 200), 100).shape == (100, 50, 3)


def test_bar_chart_sorted_rows_highlight_above_threshold():
    probs = {"nodule": 0.2, "pleural_effusion": 0.9, "cardiomegaly": 0.55}
    chart = rd.bar_chart(probs, width=400, row=20, threshold=0.5)
    assert chart.shape == (3 * 20 + 16, 400, 3)
    hi = np.array(rd.PALETTE[0])
    rows_with_highlight = [i for i in range(3)
                           if (chart[8 + i * 20 + 10] == hi).all(axis=1).any()]
    assert rows_with_highlight == [0, 1]  # 0.9 then 0.55 drawn first, both above 0.5
    first_bar = (chart[18] == hi).all(axis=1).sum()
    second_bar = (chart[38] == hi).all(axis=1).sum()
    assert first_bar > second_bar > 0
    assert rd.bar_chart({}).shape[0] > 0
