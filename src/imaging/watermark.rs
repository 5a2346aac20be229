//! Text and image watermarks.
//!
//! Both blend with standard "over" compositing in sRGB: on an RGB image the
//! colour moves towards the mark by `alpha`; on an RGBA image the alpha
//! channel rises too. The image keeps its variant (`ImageRgb8` stays RGB).

use std::borrow::Cow;
use std::sync::LazyLock;

use ab_glyph::{Font, FontRef, OutlinedGlyph, PxScale, ScaleFont, point};
use image::{DynamicImage, RgbaImage};

use crate::action::TextWatermark;

/// WenQuanYi Micro Hei (Apache-2.0): one font that covers CJK and Latin.
const FONT_DATA: &[u8] = include_bytes!("../../assets/fonts/wqy-microhei.ttc");

/// Face 0 of the collection is the proportional "WenQuanYi Micro Hei".
/// Parsing only reads the table directory, so doing it once is cheap.
static FONT: LazyLock<Option<FontRef<'static>>> =
    LazyLock::new(|| FontRef::try_from_slice_and_index(FONT_DATA, 0).ok());

/// Horizontal blank between copies of the text, in em.
const GAP_X_EM: f32 = 2.0;
/// Vertical blank between rows of copies, in em (one line plus this is ≈ 4 em).
const GAP_Y_EM: f32 = 3.0;

/// Draws `wm.text` tiled across the whole image in `wm.color` at `wm.opacity`.
///
/// The text is set at an em of `wm.em_px()` pixels, laid out with advances and
/// kerning (`\n` starts a new line), rendered once into a coverage mask and
/// stamped on a grid: copies are one text width plus 2 em apart, rows are one
/// text height plus 3 em apart, and odd rows are shifted left by half a step so
/// the marks interleave. The first copy starts at (0, 0), so even an image
/// smaller than one copy carries (part of) the mark. Characters the font lacks
/// are skipped.
pub fn draw_text(img: &mut DynamicImage, wm: &TextWatermark) {
    if let Some(stamp) = TextStamp::new(wm, img.width(), img.height()) {
        stamp.draw(img);
    }
}

/// [`draw_text`] in two steps: the text laid out and rendered once for an
/// image size, then drawn on any number of images of that size (the frames
/// of an animation).
pub struct TextStamp {
    mask: TextMask,
    color: [f32; 3],
    opacity: f32,
    step_x: i64,
    step_y: i64,
    shift: i64,
    width: u32,
    height: u32,
}

impl TextStamp {
    /// `None` when nothing would be drawn (no font, an empty image, a text
    /// of spaces or of characters the font lacks).
    pub fn new(wm: &TextWatermark, width: u32, height: u32) -> Option<TextStamp> {
        let font = FONT.as_ref()?;
        if width == 0 || height == 0 {
            return None;
        }
        let em = wm.em_px();
        let mask = TextMask::render(font, &wm.text, em, width, height)?;
        let step_x = ((mask.full_width as f32 + GAP_X_EM * em).ceil() as i64).max(1);
        let step_y = ((mask.full_height as f32 + GAP_Y_EM * em).ceil() as i64).max(1);
        // A text wider than the image gets one copy per row at x = 0, which
        // lets the mask be clipped to the image width.
        let shift = if mask.full_width <= width {
            step_x / 2
        } else {
            0
        };
        Some(TextStamp {
            mask,
            color: [wm.color.r, wm.color.g, wm.color.b].map(f32::from),
            opacity: wm.opacity.get().clamp(0.0, 1.0),
            step_x,
            step_y,
            shift,
            width,
            height,
        })
    }

    /// Tiles the text over `img`; an image of another size than the stamp
    /// was made for is left as it is.
    pub fn draw(&self, img: &mut DynamicImage) {
        let (width, height) = (self.width, self.height);
        if (img.width(), img.height()) != (width, height) {
            return;
        }
        let (w, h) = (i64::from(width), i64::from(height));
        with_rgb_or_rgba(img, |buf, channels| {
            let mut top = 0;
            let mut row = 0;
            while top < h {
                let mut left = if row % 2 == 1 && self.shift > 0 {
                    self.shift - self.step_x
                } else {
                    0
                };
                while left < w {
                    self.mask.stamp(
                        buf,
                        width,
                        height,
                        channels,
                        left,
                        top,
                        self.color,
                        self.opacity,
                    );
                    left += self.step_x;
                }
                top += self.step_y;
                row += 1;
            }
        });
    }
}

/// Composites `overlay` onto `img` with its top-left corner at (`left`, `top`),
/// respecting the overlay's alpha and scaling it by `opacity`.
///
/// The part of the overlay outside `img` is clipped; an offset beyond the
/// image draws nothing. `opacity` is clamped to [0, 1].
pub fn composite(
    img: &mut DynamicImage,
    overlay: &DynamicImage,
    left: u32,
    top: u32,
    opacity: f32,
) {
    if opacity.is_nan() || opacity <= 0.0 {
        return;
    }
    let opacity = opacity.min(1.0);
    let (width, height) = (img.width(), img.height());
    if left >= width || top >= height {
        return;
    }
    let overlay: Cow<'_, RgbaImage> = match overlay.as_rgba8() {
        Some(rgba) => Cow::Borrowed(rgba),
        None => Cow::Owned(overlay.to_rgba8()),
    };
    let cols = overlay.width().min(width - left) as usize;
    let rows = overlay.height().min(height - top) as usize;
    if cols == 0 || rows == 0 {
        return;
    }
    let ov_stride = overlay.width() as usize * 4;
    let ov: &[u8] = overlay.as_raw();

    with_rgb_or_rgba(img, |buf, channels| {
        let stride = width as usize * channels;
        for y in 0..rows {
            let dst_start = (top as usize + y) * stride + left as usize * channels;
            let dst = &mut buf[dst_start..dst_start + cols * channels];
            let src = &ov[y * ov_stride..y * ov_stride + cols * 4];
            for (px, s) in dst.chunks_exact_mut(channels).zip(src.chunks_exact(4)) {
                let alpha = f32::from(s[3]) / 255.0 * opacity;
                if alpha > 0.0 {
                    blend_over(px, [s[0], s[1], s[2]].map(f32::from), alpha);
                }
            }
        }
    });
}

/// The text rendered once: per-pixel coverage in 255ths (a byte a pixel,
/// for a mask that may be as large as the image), clipped to at most the
/// image's size (no copy can show more than that).
struct TextMask {
    /// Size of the stored (possibly clipped) coverage.
    width: usize,
    height: usize,
    coverage: Vec<u8>,
    /// Size of the whole text's ink box, before clipping.
    full_width: u32,
    full_height: u32,
}

impl TextMask {
    /// Lays out `text` at an em of `em_px` pixels. `None` when nothing would be
    /// drawn (empty text, only spaces, or only characters the font lacks).
    fn render(
        font: &FontRef<'static>,
        text: &str,
        em_px: f32,
        max_width: u32,
        max_height: u32,
    ) -> Option<TextMask> {
        let glyphs = layout(font, text, em_px);
        let (first, rest) = glyphs.split_first()?;
        let mut ink = first.px_bounds();
        for g in rest {
            let b = g.px_bounds();
            ink.min.x = ink.min.x.min(b.min.x);
            ink.min.y = ink.min.y.min(b.min.y);
            ink.max.x = ink.max.x.max(b.max.x);
            ink.max.y = ink.max.y.max(b.max.y);
        }
        let (origin_x, origin_y) = (ink.min.x.floor(), ink.min.y.floor());
        // `as` saturates, so absurd sizes stay finite and are clipped below.
        let full_width = (ink.max.x.ceil() - origin_x).max(0.0) as u32;
        let full_height = (ink.max.y.ceil() - origin_y).max(0.0) as u32;
        let width = full_width.min(max_width) as usize;
        let height = full_height.min(max_height) as usize;
        if width == 0 || height == 0 {
            return None;
        }

        let mut coverage = vec![0u8; width * height];
        for g in &glyphs {
            let b = g.px_bounds();
            let gx = (b.min.x - origin_x).round() as usize;
            let gy = (b.min.y - origin_y).round() as usize;
            if gx >= width || gy >= height {
                continue;
            }
            g.draw(|x, y, c| {
                let (x, y) = (gx + x as usize, gy + y as usize);
                if x < width && y < height {
                    // Summing lets antialiased edges of touching glyphs add
                    // up to full coverage, as one path would.
                    let cell = &mut coverage[y * width + x];
                    let add = (c.clamp(0.0, 1.0) * 255.0).round() as u16;
                    *cell = (u16::from(*cell) + add).min(255) as u8;
                }
            });
        }
        Some(TextMask {
            width,
            height,
            coverage,
            full_width,
            full_height,
        })
    }

    /// Blends one copy with its top-left corner at (`left`, `top`), clipped.
    #[allow(clippy::too_many_arguments)]
    fn stamp(
        &self,
        buf: &mut [u8],
        img_width: u32,
        img_height: u32,
        channels: usize,
        left: i64,
        top: i64,
        color: [f32; 3],
        opacity: f32,
    ) {
        let (w, h) = (i64::from(img_width), i64::from(img_height));
        let x0 = left.max(0);
        let x1 = (left + self.width as i64).min(w);
        let y0 = top.max(0);
        let y1 = (top + self.height as i64).min(h);
        if x0 >= x1 || y0 >= y1 {
            return;
        }
        let stride = img_width as usize * channels;
        for y in y0..y1 {
            let mask_row = (y - top) as usize * self.width;
            let row = &mut buf[y as usize * stride..(y as usize + 1) * stride];
            for x in x0..x1 {
                let c = self.coverage[mask_row + (x - left) as usize];
                if c > 0 {
                    let at = x as usize * channels;
                    let alpha = f32::from(c) / 255.0 * opacity;
                    blend_over(&mut row[at..at + channels], color, alpha);
                }
            }
        }
    }
}

/// Whether `text` has a character the bundled font draws: a text of
/// spaces, or only of characters it lacks (emoji), would leave no mark.
pub fn draws_something(text: &str) -> bool {
    FONT.as_ref()
        .is_some_and(|font| !layout(font, text, 16.0).is_empty())
}

/// Positions the outlined glyphs of `text`; the first line's baseline is at
/// its ascent, later lines follow at the font's line height.
///
/// ab_glyph's `PxScale` is the height of ascent − descent, not the em, so the
/// em size is converted with the font's own metrics:
/// `scale = em_px × height_unscaled / units_per_em` (what `pt_to_px_scale`
/// does, without its fixed 96 dpi).
fn layout(font: &FontRef<'static>, text: &str, em_px: f32) -> Vec<OutlinedGlyph> {
    let scale = match font.units_per_em() {
        Some(upem) if upem > 0.0 => PxScale::from(em_px * font.height_unscaled() / upem),
        _ => PxScale::from(em_px),
    };
    let scaled = font.as_scaled(scale);
    let line_height = scaled.height() + scaled.line_gap();
    let mut glyphs = Vec::new();
    for (line_no, line) in text.split('\n').enumerate() {
        let baseline = scaled.ascent() + line_no as f32 * line_height;
        let mut caret = 0.0f32;
        let mut previous = None;
        for ch in line.chars().filter(|c| !c.is_control()) {
            let id = font.glyph_id(ch);
            if id.0 == 0 {
                previous = None;
                continue;
            }
            if let Some(prev) = previous {
                caret += scaled.kern(prev, id);
            }
            let glyph = id.with_scale_and_position(scale, point(caret, baseline));
            caret += scaled.h_advance(id);
            previous = Some(id);
            if let Some(outlined) = font.outline_glyph(glyph) {
                glyphs.push(outlined);
            }
        }
    }
    glyphs
}

/// Runs `f` on the raw samples of an 8-bit RGB or RGBA image with its channel
/// count. Other variants (which the pipeline does not produce) are first
/// converted to RGBA if they have alpha, else to RGB.
fn with_rgb_or_rgba(img: &mut DynamicImage, f: impl FnOnce(&mut [u8], usize)) {
    if !matches!(
        img,
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_)
    ) {
        *img = if img.color().has_alpha() {
            DynamicImage::ImageRgba8(img.to_rgba8())
        } else {
            DynamicImage::ImageRgb8(img.to_rgb8())
        };
    }
    match img {
        DynamicImage::ImageRgb8(buf) => f(buf, 3),
        DynamicImage::ImageRgba8(buf) => f(buf, 4),
        _ => {}
    }
}

/// "Over" compositing of `color` with `alpha` in [0, 1] onto one RGB or RGBA pixel.
fn blend_over(px: &mut [u8], color: [f32; 3], alpha: f32) {
    let alpha = alpha.clamp(0.0, 1.0);
    if px.len() == 4 {
        let dst_alpha = f32::from(px[3]) / 255.0;
        let out_alpha = alpha + dst_alpha * (1.0 - alpha);
        if out_alpha <= 0.0 {
            return;
        }
        for (d, s) in px[..3].iter_mut().zip(color) {
            let v = (s * alpha + f32::from(*d) * dst_alpha * (1.0 - alpha)) / out_alpha;
            *d = to_u8(v);
        }
        px[3] = to_u8(out_alpha * 255.0);
    } else {
        for (d, s) in px.iter_mut().zip(color) {
            let v = f32::from(*d);
            *d = to_u8(v + (s - v) * alpha);
        }
    }
}

fn to_u8(v: f32) -> u8 {
    (v + 0.5).clamp(0.0, 255.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{Color, Opacity};
    use image::{Rgb, RgbImage, Rgba};

    fn mark(text: &str, opacity: f32, dpi: u32, color: Color) -> TextWatermark {
        TextWatermark {
            text: text.to_owned(),
            opacity: Opacity::new(opacity).unwrap(),
            dpi,
            color,
        }
    }

    fn white(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, Rgb([255, 255, 255])))
    }

    fn changed_in(img: &RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
        img.enumerate_pixels()
            .filter(|(x, y, p)| {
                (x0..x1).contains(x) && (y0..y1).contains(y) && p.0 != [255, 255, 255]
            })
            .count()
    }

    fn font() -> &'static FontRef<'static> {
        FONT.as_ref().expect("bundled font parses")
    }

    const RED: Color = Color { r: 255, g: 0, b: 0 };

    #[test]
    fn red_text_colours_pixels_and_leaves_the_gaps_white() {
        let wm = mark("Watermark 水印", 1.0, 150, RED);
        let mut img = white(400, 200);
        draw_text(&mut img, &wm);
        let out = img.as_rgb8().unwrap();
        assert!(
            out.pixels()
                .any(|p| p.0[0] == 255 && p.0[1] < 40 && p.0[2] < 40),
            "some pixel is fully red"
        );
        // Every changed pixel is a tint of red.
        assert!(out.pixels().all(|p| p.0[0] == 255 && p.0[1] == p.0[2]));
        let mask = TextMask::render(font(), &wm.text, wm.em_px(), 400, 200).unwrap();
        // The band between the first two rows of copies is untouched.
        let y = mask.full_height + (wm.em_px() * 1.5) as u32;
        assert_eq!(changed_in(out, 0, y, 400, y + 1), 0);
        // So is the gap after the first copy of the first row.
        let x = mask.full_width + wm.em_px() as u32;
        assert_eq!(changed_in(out, x, 0, x + 1, mask.full_height), 0);
    }

    #[test]
    fn half_opacity_blends_halfway() {
        let mut img = white(400, 200);
        draw_text(&mut img, &mark("Watermark", 0.5, 150, Color::BLACK));
        let darkest = img
            .as_rgb8()
            .unwrap()
            .pixels()
            .map(|p| p.0[0])
            .min()
            .unwrap();
        assert!((112..=142).contains(&darkest), "darkest {darkest}");
    }

    #[test]
    fn tiles_cover_every_quadrant() {
        let mut img = white(2000, 1000);
        draw_text(&mut img, &mark("Watermark", 0.25, 150, Color::BLACK));
        let out = img.as_rgb8().unwrap();
        for (x, y) in [(0, 0), (1000, 0), (0, 500), (1000, 500)] {
            assert!(
                changed_in(out, x, y, x + 1000, y + 500) > 500,
                "quadrant at ({x}, {y})"
            );
        }
    }

    #[test]
    fn small_image_gets_a_copy() {
        let mut img = white(12, 12);
        draw_text(&mut img, &mark("水印文字", 1.0, 150, Color::BLACK));
        assert!(changed_in(img.as_rgb8().unwrap(), 0, 0, 12, 12) > 0);
    }

    #[test]
    fn chinese_text_renders() {
        for ch in "水印文字".chars() {
            assert_ne!(font().glyph_id(ch).0, 0, "{ch} is in the font");
        }
        let mut img = white(400, 200);
        draw_text(&mut img, &mark("水印文字", 1.0, 150, Color::BLACK));
        let mask = TextMask::render(font(), "水印文字", 150.0 * 10.0 / 72.0, 400, 200).unwrap();
        let first_copy = changed_in(
            img.as_rgb8().unwrap(),
            0,
            0,
            mask.full_width,
            mask.full_height,
        );
        assert!(first_copy > 300, "{first_copy} changed pixels");
    }

    #[test]
    fn missing_glyphs_are_skipped() {
        // U+E000 (private use) and U+1F600 are not in the font.
        let with_missing = TextMask::render(font(), "\u{E000}Ab\u{1F600}", 20.0, 500, 500).unwrap();
        let plain = TextMask::render(font(), "Ab", 20.0, 500, 500).unwrap();
        assert_eq!(with_missing.full_width, plain.full_width);
        assert!(TextMask::render(font(), "\u{E000} \t", 20.0, 500, 500).is_none());
        let mut img = white(50, 50);
        draw_text(&mut img, &mark("\u{E000}", 1.0, 150, Color::BLACK));
        assert_eq!(changed_in(img.as_rgb8().unwrap(), 0, 0, 50, 50), 0);
    }

    #[test]
    fn em_follows_dpi() {
        let ink = |dpi: u32| {
            let wm = mark("水印 Wm", 1.0, dpi, Color::BLACK);
            let mut img = white(800, 400);
            draw_text(&mut img, &wm);
            let mask = TextMask::render(font(), &wm.text, wm.em_px(), 800, 400).unwrap();
            // Only the first copy lies in its own ink box. Summing darkness
            // measures covered area; counting changed pixels would overweight
            // the antialiased rim, which grows only linearly.
            let out = img.as_rgb8().unwrap();
            let mut ink = 0.0;
            for y in 0..mask.full_height {
                for x in 0..mask.full_width {
                    ink += f32::from(255 - out.get_pixel(x, y).0[0]) / 255.0;
                }
            }
            ink
        };
        let ratio = ink(300) / ink(150);
        assert!((3.6..=4.4).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn em_is_the_requested_size() {
        // CJK ideographs fill most of the em square.
        let mask = TextMask::render(font(), "水", 100.0, 500, 500).unwrap();
        assert!((80..=100).contains(&mask.full_width), "{}", mask.full_width);
    }

    #[test]
    fn text_on_rgba_raises_alpha_and_keeps_the_variant() {
        let mut img = DynamicImage::ImageRgba8(RgbaImage::from_pixel(300, 100, Rgba([0, 0, 0, 0])));
        draw_text(&mut img, &mark("水印文字", 1.0, 150, RED));
        let out = img.as_rgba8().expect("still RGBA");
        assert!(out.pixels().any(|p| p.0 == [255, 0, 0, 255]));
        // Colour stays pure red wherever alpha was raised.
        assert!(out.pixels().all(|p| p.0[3] == 0 || p.0[..3] == [255, 0, 0]));
    }

    fn blue_square() -> DynamicImage {
        DynamicImage::ImageRgba8(RgbaImage::from_pixel(10, 10, Rgba([0, 0, 255, 255])))
    }

    #[test]
    fn composite_opaque_overlay() {
        let mut img = white(20, 20);
        composite(&mut img, &blue_square(), 5, 5, 1.0);
        let out = img.as_rgb8().expect("still RGB");
        assert_eq!(out.get_pixel(7, 7).0, [0, 0, 255]);
        assert_eq!(out.get_pixel(14, 14).0, [0, 0, 255]);
        assert_eq!(out.get_pixel(2, 2).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(15, 15).0, [255, 255, 255]);
    }

    #[test]
    fn composite_scales_by_opacity() {
        let mut img = white(20, 20);
        composite(&mut img, &blue_square(), 5, 5, 0.25);
        let p = img.as_rgb8().unwrap().get_pixel(7, 7).0;
        assert_eq!(p[2], 255);
        assert!((188..=194).contains(&p[0]) && p[0] == p[1], "{p:?}");
    }

    #[test]
    fn composite_respects_overlay_alpha() {
        let mut overlay = RgbaImage::from_pixel(10, 10, Rgba([0, 0, 255, 255]));
        for y in 0..10 {
            for x in 5..10 {
                overlay.put_pixel(x, y, Rgba([0, 0, 255, 0]));
            }
        }
        let mut img = white(20, 20);
        composite(&mut img, &DynamicImage::ImageRgba8(overlay), 0, 0, 1.0);
        let out = img.as_rgb8().unwrap();
        assert_eq!(out.get_pixel(2, 2).0, [0, 0, 255]);
        assert_eq!(out.get_pixel(7, 2).0, [255, 255, 255]);
    }

    #[test]
    fn composite_onto_rgba_is_over() {
        let mut img = DynamicImage::ImageRgba8(RgbaImage::from_pixel(20, 20, Rgba([255, 0, 0, 0])));
        let half_blue =
            DynamicImage::ImageRgba8(RgbaImage::from_pixel(10, 10, Rgba([0, 0, 255, 128])));
        composite(&mut img, &half_blue, 0, 0, 1.0);
        composite(&mut img, &half_blue, 10, 10, 0.5);
        let out = img.as_rgba8().expect("still RGBA");
        // Over a transparent pixel the overlay shows as it is.
        assert_eq!(out.get_pixel(3, 3).0, [0, 0, 255, 128]);
        assert_eq!(out.get_pixel(12, 12).0, [0, 0, 255, 64]);
        assert_eq!(out.get_pixel(18, 3).0, [255, 0, 0, 0]);

        let mut opaque =
            DynamicImage::ImageRgba8(RgbaImage::from_pixel(4, 4, Rgba([255, 255, 255, 255])));
        composite(&mut opaque, &half_blue, 0, 0, 1.0);
        let p = opaque.as_rgba8().unwrap().get_pixel(1, 1).0;
        assert_eq!(p[3], 255);
        assert!((125..=129).contains(&p[0]) && p[2] == 255, "{p:?}");
    }

    #[test]
    fn composite_clips_and_ignores_offsets_beyond_the_image() {
        let mut img = white(20, 20);
        composite(&mut img, &blue_square(), 15, 18, 1.0);
        let out = img.as_rgb8().unwrap();
        assert_eq!(out.get_pixel(19, 19).0, [0, 0, 255]);
        assert_eq!(out.get_pixel(14, 19).0, [255, 255, 255]);

        let before = white(20, 20);
        for (l, t) in [(20, 0), (0, 20), (u32::MAX, u32::MAX)] {
            let mut img = before.clone();
            composite(&mut img, &blue_square(), l, t, 1.0);
            assert_eq!(img, before);
        }
    }

    #[test]
    fn composite_accepts_rgb_overlays() {
        let mut img = white(8, 8);
        let green = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 4, Rgb([0, 255, 0])));
        composite(&mut img, &green, 2, 2, 1.0);
        assert_eq!(img.as_rgb8().unwrap().get_pixel(3, 3).0, [0, 255, 0]);
    }
}
