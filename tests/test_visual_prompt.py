import numpy as np
import pytest
from PIL import Image

from visual_prompts import (COLORS, MASK_ALPHA, SHAPES, crop_box, draw_visual_prompt, outside_crop, parse_color,
                            parse_coords)

GREY = (128, 128, 128)
RED = (255, 0, 0)


def grey(w=336, h=336):
    return Image.new("RGB", (w, h), GREY)


def px(image, x, y):
    return tuple(int(v) for v in np.asarray(image)[y, x])


# shape, coords, a pixel on the mark, a pixel far from it
CASES = [
    ("box", [40, 60, 220, 300], (41, 150), (130, 180)),
    ("ellipse", [40, 60, 220, 300], (41, 180), (130, 180)),
    ("triangle", [40, 60, 220, 60, 130, 300], (130, 61), (130, 320)),
    ("point", [100, 100], (100, 100), (130, 180)),
    ("arrow", [300, 300, 100, 100], (200, 200), (60, 250)),
    ("scribble", [20, 20, 100, 60, 200, 20], (100, 60), (100, 250)),
    ("mask", [40, 60, 220, 60, 130, 300], (130, 150), (20, 300)),
    ("mask_contour", [40, 60, 220, 60, 130, 300], (130, 61), (130, 150)),
]


@pytest.mark.parametrize("shape, coords, on, far", CASES)
def test_each_shape_draws_its_colour_and_leaves_the_rest_unchanged(shape, coords, on, far):
    base = grey()
    out = draw_visual_prompt(base, shape, coords, color="lime")
    alpha = MASK_ALPHA if shape == "mask" else 255
    f = alpha / 255
    expected = tuple(round(f * c + (1 - f) * g) for c, g in zip(COLORS["lime"], GREY))
    assert np.allclose(px(out, *on), expected, atol=1)
    assert px(out, *far) == GREY
    # No anti-aliasing: every pixel is either untouched or exactly the blended colour.
    a, b = np.asarray(out).astype(int), np.asarray(base).astype(int)
    changed = (a != b).any(-1)
    assert changed.sum() > 50
    assert (np.abs(a[changed] - expected) <= 1).all()


def test_box_edge_is_pure_red_and_inside_untouched():
    out = draw_visual_prompt(grey(), "box", [40, 60, 220, 300])
    assert px(out, 40, 150) == px(out, 43, 150) == RED  # 4 px at 336, drawn inwards
    assert px(out, 44, 150) == px(out, 39, 150) == GREY


def test_box_corners_in_any_order_and_rectangle_alias():
    a = draw_visual_prompt(grey(), "box", [40, 60, 220, 300])
    b = draw_visual_prompt(grey(), "rectangle", [220, 300, 40, 60])
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_alpha_blends():
    out = draw_visual_prompt(grey(), "box", [40, 60, 220, 300], color=(0, 0, 255), alpha=100)
    expected = [round(100 / 255 * c + 155 / 255 * g) for c, g in zip((0, 0, 255), GREY)]
    assert np.allclose(px(out, 41, 150), expected, atol=1)


def line_width(image, y, x0):
    """Run of red pixels starting at column x0 on row y."""
    row = np.asarray(image)[y, x0:]
    return int(np.argmin((row == RED).all(-1)))


def test_default_width_scales_with_image_size():
    small = draw_visual_prompt(grey(336, 200), "box", [40, 60, 220, 190])
    big = draw_visual_prompt(grey(1008, 600), "box", [120, 180, 660, 570])
    assert line_width(small, 100, 40) == 4
    assert line_width(big, 300, 120) == 12


def test_width_overrides_in_original_pixels():
    out = draw_visual_prompt(grey(1008, 600), "box", [120, 180, 660, 570], width=2)
    assert line_width(out, 300, 120) == 2
    dot = draw_visual_prompt(grey(), "point", [100, 100], width=3)  # a point's width is its radius
    assert px(dot, 103, 100) == RED and px(dot, 105, 100) == GREY


def test_arrow_head_at_target_and_tail_drawn():
    out = draw_visual_prompt(grey(), "arrow", [300, 100, 100, 100])  # points left, head at x=100
    assert px(out, 102, 100) == RED  # just behind the tip
    assert px(out, 110, 108) == RED  # the head is wider than the 3-px shaft
    assert px(out, 200, 108) == GREY
    assert px(out, 299, 100) == RED  # tail end
    assert px(out, 97, 100) == GREY and px(out, 303, 100) == GREY  # nothing past either end


def test_scribble_passes_through_its_points():
    pts = [20, 20, 100, 60, 200, 20, 300, 200]
    out = draw_visual_prompt(grey(), "scribble", pts)
    for x, y in zip(pts[0::2], pts[1::2]):
        assert px(out, x, y) == RED


def test_deterministic():
    for shape, coords, _, _ in CASES:
        a = draw_visual_prompt(grey(), shape, coords)
        b = draw_visual_prompt(grey(), shape, coords)
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_any_mode_gives_rgb_of_same_size(mode):
    image = Image.new(mode, (120, 80))
    out = draw_visual_prompt(image, "point", [60, 40])
    assert out.mode == "RGB" and out.size == (120, 80)
    assert image.mode == mode  # the input is not modified


def test_transparent_pixels_become_white_as_the_processor_sees_them():
    out = draw_visual_prompt(Image.new("RGBA", (120, 80), (10, 20, 30, 0)), "point", [60, 40])
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((60, 40)) == RED


def test_image_border_coordinates_are_accepted():
    out = draw_visual_prompt(grey(451, 300), "box", [0, 0, 451, 300])
    assert px(out, 450, 150) == RED and px(out, 225, 299) == RED


def test_parse_color():
    assert parse_color("red") == RED
    assert parse_color(" Gold ") == (255, 215, 0)
    assert parse_color("10, 20,30") == (10, 20, 30)
    assert parse_color((1, 2, 3)) == (1, 2, 3)
    assert len(COLORS) == 9 and COLORS["purple"] == (128, 0, 128)
    with pytest.raises(ValueError, match="red, lime, blue.*gold"):
        parse_color("crimson")
    for bad in ["300,0,0", "1,2", "1,2,3,4", "a,b,c", "1.5,2,3", (0, 0, -1), (1, 2)]:
        with pytest.raises(ValueError, match="0..255"):
            parse_color(bad)


def test_parse_coords():
    assert parse_coords("40,60,220,300", "box") == [40.0, 60.0, 220.0, 300.0]
    assert parse_coords("1, 2, 3.5, 4", "scribble") == [1.0, 2.0, 3.5, 4.0]
    with pytest.raises(ValueError, match=r"--box expects x1,y1,x2,y2 \(4 numbers\), got '40,60'"):
        parse_coords("40,60", "box")
    with pytest.raises(ValueError, match="--point expects x,y"):
        parse_coords("a,b", "point")
    with pytest.raises(ValueError, match="--mask expects .*at least 6"):
        parse_coords("1,2,3,4", "mask")  # two points are not a polygon
    with pytest.raises(ValueError, match="--scribble expects .*even"):
        parse_coords("1,2,3,4,5", "scribble")
    with pytest.raises(ValueError, match="--mask-contour"):
        parse_coords("1,2,3", "mask_contour")
    with pytest.raises(ValueError):
        parse_coords("1,nan", "point")


def test_draw_errors():
    image = grey(451, 300)
    with pytest.raises(ValueError, match=r"point \(600, 20\) is outside the 451x300 image"):
        draw_visual_prompt(image, "point", [600, 20])
    with pytest.raises(ValueError, match="outside the 451x300"):
        draw_visual_prompt(image, "box", [10, 10, 20, -1])
    with pytest.raises(ValueError, match="star.*" + ", ".join(SHAPES)):
        draw_visual_prompt(image, "star", [1, 2])
    with pytest.raises(ValueError, match="triangle expects x1,y1,x2,y2,x3,y3"):
        draw_visual_prompt(image, "triangle", [1, 2, 3, 4])
    with pytest.raises(ValueError, match="zero area"):
        draw_visual_prompt(image, "box", [10, 10, 10, 50])
    with pytest.raises(ValueError, match="zero area"):
        draw_visual_prompt(image, "triangle", [0, 0, 10, 10, 20, 20])
    with pytest.raises(ValueError, match="same point"):
        draw_visual_prompt(image, "arrow", [5, 5, 5, 5])
    with pytest.raises(ValueError, match="alpha"):
        draw_visual_prompt(image, "point", [5, 5], alpha=300)
    with pytest.raises(ValueError, match="colour"):
        draw_visual_prompt(image, "point", [5, 5], color="crimson")
    for width in (0, -3, 0.4, float("nan")):  # would draw a 1-pixel line: refused, not silently changed
        with pytest.raises(ValueError, match="width must be at least 1 pixel"):
            draw_visual_prompt(image, "box", [10, 10, 40, 50], width=width)
    draw_visual_prompt(image, "box", [10, 10, 40, 50], width=1)  # the thinnest line is fine


def test_crop_box_and_outside_crop():
    assert crop_box(451, 300) == (75, 0, 375, 300)
    assert crop_box(300, 500) == (0, 100, 300, 400)
    assert crop_box(336, 336) == (0, 0, 336, 336)
    assert not outside_crop([100, 50, 300, 250], 451, 300)
    assert outside_crop([40, 60, 220, 280], 451, 300)  # x = 40 is cut away
    assert outside_crop([150, 20], 300, 500)
