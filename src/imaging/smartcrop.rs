//! Attention-based crop placement for gravity 9.
//!
//! The idea is libvips' `attention` smartcrop: in CIE Lab, interest is the
//! Sobel edge strength of L plus skin-coloured pixels plus strongly saturated
//! pixels. Unlike libvips (which blurs the map and centres the crop on its
//! maximum) the window with the largest summed interest is searched directly
//! with a summed-area table, giving extra weight to interest near the
//! window's centre so that an interesting area ends up in the middle of the
//! crop when the image's edges allow.

use image::{DynamicImage, RgbImage};

/// The interest map is computed on a copy whose longest side is at most this.
const WORK_SIDE: u32 = 256;

/// Weight of a fully skin-coloured or fully saturated pixel, on the scale of
/// the edge term (|Gx| + |Gy| of L in 0..100, so at most 800). libvips adds
/// its skin and saturation masks as 255 each.
const SKIN_WEIGHT: f32 = 255.0;
const SATURATION_WEIGHT: f32 = 255.0;

/// libvips' skin box in Lab (trained on the Humanae project): a in 3..22,
/// b in 4..31, L at least 15. Outside it the likelihood falls linearly to
/// zero over `SKIN_SOFTNESS` units instead of dropping at once.
const SKIN_A: (f32, f32) = (3.0, 22.0);
const SKIN_B: (f32, f32) = (4.0, 31.0);
const SKIN_MIN_L: f32 = 15.0;
const SKIN_SOFTNESS: f32 = 4.0;

/// libvips counts chroma above 60 as saturated; here the score ramps from 0
/// at chroma 55 to 1 at chroma 65, around the same threshold. (A ramp from
/// 45 let a large, softly coloured background, such as the blurred green
/// behind the corpus's ladybird at chroma 40-60, outweigh a small, vivid
/// subject.)
const SATURATION_RAMP: (f32, f32) = (55.0, 65.0);

/// The top-left corner of the most interesting `width` x `height` region of `img`.
/// `width` and `height` are already clamped to the image.
///
/// Among equally interesting windows (a flat image) the one nearest the centre wins.
/// Transparent pixels count as what shows of them: colour is taken over
/// black (so a shape's outline is an edge) and skin and saturation are
/// weighted by alpha, never the colour hidden under a clear pixel.
pub fn attention_origin(img: &DynamicImage, width: u32, height: u32) -> (u32, u32) {
    let (img_w, img_h) = (img.width(), img.height());
    if img_w == 0 || img_h == 0 {
        return (0, 0);
    }
    let width = width.clamp(1, img_w);
    let height = height.clamp(1, img_h);
    if width == img_w && height == img_h {
        return (0, 0);
    }

    let thumbnail;
    let source = if img_w.max(img_h) > WORK_SIDE {
        thumbnail = img.thumbnail(WORK_SIDE, WORK_SIDE);
        &thumbnail
    } else {
        img
    };
    let (small, alpha) = visible(source);
    let (sw, sh) = (small.width() as usize, small.height() as usize);
    let scale_x = sw as f64 / f64::from(img_w);
    let scale_y = sh as f64 / f64::from(img_h);
    let win_w = ((f64::from(width) * scale_x).round() as usize).clamp(1, sw);
    let win_h = ((f64::from(height) * scale_y).round() as usize).clamp(1, sh);

    let table = SummedArea::new(&interest_map(&small, alpha.as_deref()), sw, sh);
    let (x, y) = best_window(&table, win_w, win_h);

    // Map the window's centre back, so rounding of the small window's size
    // does not shift the crop.
    let centre_x = (x as f64 + win_w as f64 / 2.0) / scale_x;
    let centre_y = (y as f64 + win_h as f64 / 2.0) / scale_y;
    let left = (centre_x - f64::from(width) / 2.0).round();
    let top = (centre_y - f64::from(height) / 2.0).round();
    (
        left.clamp(0.0, f64::from(img_w - width)) as u32,
        top.clamp(0.0, f64::from(img_h - height)) as u32,
    )
}

/// The colour `img` shows, over black, and its alpha in 0..1 when it has one.
fn visible(img: &DynamicImage) -> (RgbImage, Option<Vec<f32>>) {
    if !img.color().has_alpha() {
        return (img.to_rgb8(), None);
    }
    let rgba = img.to_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    let mut alpha = Vec::with_capacity(rgba.len() / 4);
    for (dst, src) in rgb.pixels_mut().zip(rgba.pixels()) {
        let a = u32::from(src[3]);
        for c in 0..3 {
            dst[c] = ((u32::from(src[c]) * a + 127) / 255) as u8;
        }
        alpha.push(a as f32 / 255.0);
    }
    (rgb, Some(alpha))
}

/// Per-pixel interest of `img`, row-major; the colour terms weighted by
/// `alpha` when there is one.
fn interest_map(img: &RgbImage, alpha: Option<&[f32]>) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let lab: Vec<[f32; 3]> = img.pixels().map(|p| srgb_to_lab(p.0)).collect();
    let l_at = |x: usize, y: usize| lab[y * w + x][0];

    let mut interest = Vec::with_capacity(w * h);
    for y in 0..h {
        let (up, down) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let (left, right) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let gx = (l_at(right, up) + 2.0 * l_at(right, y) + l_at(right, down))
                - (l_at(left, up) + 2.0 * l_at(left, y) + l_at(left, down));
            let gy = (l_at(left, down) + 2.0 * l_at(x, down) + l_at(right, down))
                - (l_at(left, up) + 2.0 * l_at(x, up) + l_at(right, up));
            let [l, a, b] = lab[y * w + x];
            let shown = alpha.map_or(1.0, |alpha| alpha[y * w + x]);
            interest.push(
                gx.abs()
                    + gy.abs()
                    + shown
                        * (SKIN_WEIGHT * skin_likelihood(l, a, b)
                            + SATURATION_WEIGHT * saturation(a, b)),
            );
        }
    }
    interest
}

fn skin_likelihood(l: f32, a: f32, b: f32) -> f32 {
    // 1 inside [lo, hi], falling to 0 at `SKIN_SOFTNESS` outside.
    let inside = |v: f32, (lo, hi): (f32, f32)| {
        let outside = (lo - v).max(v - hi).max(0.0);
        (1.0 - outside / SKIN_SOFTNESS).max(0.0)
    };
    let bright = (1.0 - (SKIN_MIN_L - l).max(0.0) / SKIN_SOFTNESS).max(0.0);
    inside(a, SKIN_A) * inside(b, SKIN_B) * bright
}

fn saturation(a: f32, b: f32) -> f32 {
    let chroma = a.hypot(b);
    let (lo, hi) = SATURATION_RAMP;
    ((chroma - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// sRGB (D65) to CIE L*a*b*, L in 0..100.
fn srgb_to_lab([r, g, b]: [u8; 3]) -> [f32; 3] {
    fn linear(c: u8) -> f32 {
        let c = f32::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    }
    fn f(t: f32) -> f32 {
        const EPSILON: f32 = 216.0 / 24389.0;
        if t > EPSILON {
            t.cbrt()
        } else {
            t * (24389.0 / 27.0) / 116.0 + 16.0 / 116.0
        }
    }
    let (r, g, b) = (linear(r), linear(g), linear(b));
    let x = (0.412_456_4 * r + 0.357_576_1 * g + 0.180_437_5 * b) / 0.950_47;
    let y = 0.212_672_9 * r + 0.715_152_2 * g + 0.072_175 * b;
    let z = (0.019_333_9 * r + 0.119_192 * g + 0.950_304_1 * b) / 1.088_83;
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// Sums of any axis-aligned rectangle of a map in constant time.
struct SummedArea {
    stride: usize,
    sums: Vec<f64>,
}

impl SummedArea {
    fn new(values: &[f32], w: usize, h: usize) -> SummedArea {
        let stride = w + 1;
        let mut sums = vec![0.0f64; stride * (h + 1)];
        for y in 0..h {
            let mut row = 0.0f64;
            for x in 0..w {
                row += f64::from(values[y * w + x]);
                sums[(y + 1) * stride + x + 1] = sums[y * stride + x + 1] + row;
            }
        }
        SummedArea { stride, sums }
    }

    fn sum(&self, x: usize, y: usize, w: usize, h: usize) -> f64 {
        let s = self.stride;
        self.sums[(y + h) * s + x + w] - self.sums[y * s + x + w] - self.sums[(y + h) * s + x]
            + self.sums[y * s + x]
    }
}

/// Widths (and heights), as fractions of the window, of the centred strips
/// whose sums make a window's score: full-height strips of these widths plus
/// full-width strips of these heights. Interest in the window counts from 2
/// (a corner) to 8 times (the centre), so of the windows that hold an
/// interesting area the one that centres it wins, and along one axis even
/// when an image edge stops the window from centring it along the other.
const SCORE_STRIPS: [f64; 4] = [1.0, 0.75, 0.5, 0.25];

/// Top-left corner of the `win_w` x `win_h` window with the highest score
/// (see [`SCORE_STRIPS`]). Ties go to the window nearest the map's centre.
fn best_window(table: &SummedArea, win_w: usize, win_h: usize) -> (usize, usize) {
    let map_w = table.stride - 1;
    let map_h = table.sums.len() / table.stride - 1;
    let strip = |f: f64, len: usize| {
        let part = ((len as f64 * f).round() as usize).clamp(1, len);
        ((len - part) / 2, part)
    };
    let columns = SCORE_STRIPS.map(|f| strip(f, win_w));
    let rows = SCORE_STRIPS.map(|f| strip(f, win_h));
    let score = |x: usize, y: usize| -> f64 {
        let columns: f64 = columns
            .iter()
            .map(|&(inset, w)| table.sum(x + inset, y, w, win_h))
            .sum();
        let rows: f64 = rows
            .iter()
            .map(|&(inset, h)| table.sum(x, y + inset, win_w, h))
            .sum();
        columns + rows
    };
    let (max_x, max_y) = (map_w - win_w, map_h - win_h);
    let centre_distance =
        |x: usize, y: usize| x.abs_diff(max_x / 2).pow(2) + y.abs_diff(max_y / 2).pow(2);

    let mut best = (max_x / 2, max_y / 2);
    let mut best_score = score(best.0, best.1);
    for y in 0..=max_y {
        for x in 0..=max_x {
            let score = score(x, y);
            let tolerance = 1e-9 * best_score.abs().max(1.0);
            let better = score > best_score + tolerance
                || (score >= best_score - tolerance
                    && centre_distance(x, y) < centre_distance(best.0, best.1));
            if better {
                best = (x, y);
                best_score = score;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, Rgba, RgbaImage};

    const GREY: Rgb<u8> = Rgb([128, 128, 128]);
    const SKIN: Rgb<u8> = Rgb([224, 172, 140]);

    /// A 60x60 checkerboard of saturated red and blue at (`left`, `top`).
    fn with_patch(w: u32, h: u32, left: u32, top: u32) -> DynamicImage {
        let mut img = RgbImage::from_pixel(w, h, GREY);
        for y in top..top + 60 {
            for x in left..left + 60 {
                let red = ((x - left) / 6 + (y - top) / 6).is_multiple_of(2);
                img.put_pixel(
                    x,
                    y,
                    if red {
                        Rgb([230, 20, 20])
                    } else {
                        Rgb([20, 20, 230])
                    },
                );
            }
        }
        DynamicImage::ImageRgb8(img)
    }

    fn disk(img: &mut RgbImage, cx: i64, cy: i64, r: i64, color: Rgb<u8>) {
        for y in cy - r..=cy + r {
            for x in cx - r..=cx + r {
                if (x - cx).pow(2) + (y - cy).pow(2) <= r * r {
                    img.put_pixel(x as u32, y as u32, color);
                }
            }
        }
    }

    /// Whether the crop at `origin` of size `size` holds the rectangle `area`.
    fn contains(origin: (u32, u32), size: (u32, u32), area: (u32, u32, u32, u32)) -> bool {
        let (x, y) = origin;
        let (l, t, w, h) = area;
        x <= l && y <= t && x + size.0 >= l + w && y + size.1 >= t + h
    }

    #[test]
    fn finds_a_patch_top_left() {
        let origin = attention_origin(&with_patch(600, 400, 20, 20), 200, 200);
        assert!(contains(origin, (200, 200), (20, 20, 60, 60)), "{origin:?}");
    }

    #[test]
    fn finds_a_patch_bottom_right() {
        let origin = attention_origin(&with_patch(600, 400, 520, 320), 200, 200);
        assert!(
            contains(origin, (200, 200), (520, 320, 60, 60)),
            "{origin:?}"
        );
    }

    #[test]
    fn centres_the_crop_on_the_patch_when_it_can() {
        let origin = attention_origin(&with_patch(600, 400, 250, 40), 200, 200);
        // The patch's centre (280, 70) is near the crop's centre horizontally;
        // vertically the crop is pinned to the top edge.
        assert!(origin.0.abs_diff(180) <= 12 && origin.1 <= 10, "{origin:?}");
    }

    #[test]
    fn centres_along_one_axis_when_the_other_is_at_an_edge() {
        // The patch hugs the top edge; the crop still centres it horizontally:
        // it lies in the crop's central quarter, the finest strip of the score.
        let origin = attention_origin(&with_patch(4000, 3000, 3000, 100), 1000, 1000);
        assert_eq!(origin.1, 0);
        assert!(
            origin.0 + 375 <= 3000 && origin.0 + 625 >= 3060,
            "{origin:?}"
        );
    }

    #[test]
    fn finds_a_patch_in_a_large_image() {
        let origin = attention_origin(&with_patch(3000, 2000, 2900, 60), 400, 300);
        assert!(
            contains(origin, (400, 300), (2900, 60, 60, 60)),
            "{origin:?}"
        );
    }

    #[test]
    fn works_on_small_images_without_downscaling() {
        let origin = attention_origin(&with_patch(200, 100, 130, 30), 80, 80);
        assert!(contains(origin, (80, 80), (130, 30, 60, 60)), "{origin:?}");
    }

    #[test]
    fn skin_is_preferred_over_a_flat_area() {
        let mut img = RgbImage::from_pixel(600, 400, GREY);
        disk(&mut img, 480, 280, 40, SKIN);
        let origin = attention_origin(&DynamicImage::ImageRgb8(img), 200, 200);
        assert!(
            contains(origin, (200, 200), (440, 240, 80, 80)),
            "{origin:?}"
        );
    }

    #[test]
    fn skin_outweighs_an_equally_edged_grey_blob() {
        // Same lightness as the skin tone, so both disks have the same edges.
        let grey_twin = Rgb([183, 183, 183]);
        assert!((srgb_to_lab(grey_twin.0)[0] - srgb_to_lab(SKIN.0)[0]).abs() < 1.0);
        let mut img = RgbImage::from_pixel(600, 400, GREY);
        disk(&mut img, 120, 200, 40, grey_twin);
        disk(&mut img, 480, 200, 40, SKIN);
        let origin = attention_origin(&DynamicImage::ImageRgb8(img), 200, 200);
        assert!(
            contains(origin, (200, 200), (440, 160, 80, 80)),
            "{origin:?}"
        );
    }

    #[test]
    fn the_skin_box_matches_libvips() {
        let [l, a, b] = srgb_to_lab(SKIN.0);
        assert_eq!(skin_likelihood(l, a, b), 1.0, "Lab {l} {a} {b}");
        let [l, a, b] = srgb_to_lab([40, 90, 200]);
        assert_eq!(skin_likelihood(l, a, b), 0.0);
        let [l, a, b] = srgb_to_lab([128, 128, 128]);
        assert_eq!(skin_likelihood(l, a, b), 0.0);
        assert_eq!(saturation(a, b), 0.0);
    }

    #[test]
    fn a_flat_image_gets_the_centre() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(600, 400, GREY));
        let origin = attention_origin(&img, 200, 200);
        assert!(
            origin.0.abs_diff(200) <= 3 && origin.1.abs_diff(100) <= 3,
            "{origin:?}"
        );
    }

    #[test]
    fn a_crop_the_size_of_the_image_is_at_the_origin() {
        let img = with_patch(600, 400, 500, 300);
        assert_eq!(attention_origin(&img, 600, 400), (0, 0));
        assert_eq!(attention_origin(&img, 600, 100).0, 0);
        assert_eq!(attention_origin(&img, 100, 400).1, 0);
    }

    #[test]
    fn rgba_images_work() {
        let rgba = with_patch(600, 400, 500, 20).to_rgba8();
        let origin = attention_origin(&DynamicImage::ImageRgba8(rgba), 150, 150);
        assert!(
            contains(origin, (150, 150), (500, 20, 60, 60)),
            "{origin:?}"
        );
    }

    #[test]
    fn colour_under_clear_pixels_is_not_interest() {
        // A busy checkerboard hidden under alpha 0 on the right, an opaque
        // red disk shown on the left: the crop takes the disk.
        let mut img = image::RgbaImage::from_fn(600, 200, |x, y| {
            let on = (x / 8 + y / 8) % 2 == 0;
            let c = if on { [0, 255, 0, 0] } else { [255, 0, 255, 0] };
            image::Rgba(c)
        });
        for (x, y, p) in img.enumerate_pixels_mut() {
            if (x as i32 - 100).pow(2) + (y as i32 - 100).pow(2) < 30 * 30 {
                *p = image::Rgba([220, 30, 30, 255]);
            }
        }
        let origin = attention_origin(&DynamicImage::ImageRgba8(img), 100, 100);
        assert!(contains(origin, (100, 100), (70, 70, 60, 60)), "{origin:?}");
    }

    #[test]
    fn the_crop_always_fits() {
        for (w, h) in [
            (1, 1),
            (2, 1),
            (1, 700),
            (700, 1),
            (257, 3),
            (999, 1000),
            (31, 17),
        ] {
            let img = DynamicImage::ImageRgba8(RgbaImage::from_fn(w, h, |x, y| {
                Rgba([
                    (x * 37 % 256) as u8,
                    (y * 91 % 256) as u8,
                    ((x ^ y) % 256) as u8,
                    255,
                ])
            }));
            for (cw, ch) in [(1, 1), (w, 1), (1, h), (w / 2 + 1, h / 3 + 1), (w, h)] {
                let (x, y) = attention_origin(&img, cw, ch);
                assert!(
                    x + cw <= w && y + ch <= h,
                    "{w}x{h} crop {cw}x{ch} at ({x}, {y})"
                );
            }
        }
    }
}
