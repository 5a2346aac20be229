//! Crop, rotate and resize: sizes are computed here once, and applied to a
//! still image or to every frame of an animation.

use std::cell::RefCell;

use fast_image_resize as fr;
use image::{DynamicImage, GenericImageView};

use super::{ImagingError, Lead, LeadFrame, Pixels, smartcrop};
use crate::action::{Action, Crop, CropAnchor, Gravity, Op, Resize, ResizeMode, Rotation};

/// The pipeline's first operation other than `format`, with its index, when
/// the decoder can fold it into decoding (see [`Lead`]).
pub(super) fn lead(action: &Action) -> (usize, Lead<'_>) {
    let found = action
        .ops
        .iter()
        .enumerate()
        .find(|(_, op)| !matches!(op, Op::Format(_)));
    match found {
        Some((i, Op::Resize(r))) => (i, Lead::Resize(r)),
        Some((i, Op::Crop(c))) => (i, Lead::Crop(c)),
        _ => (0, Lead::Nothing),
    }
}

/// `action` with each `rotate` that comes right before a `resize` (or with
/// only `format` between them) moved after it, the resize's sides swapped
/// for a quarter turn, repeatedly, so that resizes meet the unrotated
/// image: a leading one can shrink the JPEG on load, and the rotation turns
/// the smaller result. The output is the same size and, up to rounding in
/// the resampler, the same pixels. A resize that pads to both sides (`m_0`)
/// stays where it is: it centres the image rounding down, which a turn
/// would move by a pixel. So does one after `rotate:a_0`.
pub(super) fn resize_before_rotate(action: &Action) -> std::borrow::Cow<'_, Action> {
    reordered(action).0
}

/// [`resize_before_rotate`], with whether each operation of the result is
/// a resize moved across an odd number of quarter turns (its sides
/// swapped): an error it gives names the sides the user asked for by
/// swapping them back. Empty when nothing moved.
pub(super) fn reordered(action: &Action) -> (std::borrow::Cow<'_, Action>, Vec<bool>) {
    if next_move(&action.ops).is_none() {
        return (std::borrow::Cow::Borrowed(action), Vec::new());
    }
    let mut ops = action.ops.clone();
    let mut turned = vec![false; ops.len()];
    // Each move takes a resize to the left of a turn, so this ends.
    while let Some((turn_at, resize_at)) = next_move(&ops) {
        if let (Op::Rotate(turn), Op::Resize(r)) = (ops[turn_at].clone(), ops[resize_at].clone()) {
            let quarter = matches!(turn, Rotation::R90 | Rotation::R270);
            let r = if quarter {
                Resize {
                    width: r.height,
                    height: r.width,
                    mode: r.mode,
                }
            } else {
                r
            };
            ops.remove(resize_at);
            ops.insert(turn_at, Op::Resize(r));
            let flag = turned.remove(resize_at) ^ quarter;
            turned.insert(turn_at, flag);
        }
    }
    (std::borrow::Cow::Owned(Action { ops }), turned)
}

/// The first turn that a resize can move before: (its index, the resize's).
/// Only `format` may stand between them (it changes no pixels).
fn next_move(ops: &[Op]) -> Option<(usize, usize)> {
    ops.iter().enumerate().find_map(|(i, op)| {
        // `rotate:a_0` turns nothing, and stays a way to keep the decoder
        // from folding in the operation after it.
        if !matches!(op, Op::Rotate(turn) if *turn != Rotation::R0) {
            return None;
        }
        let j = i
            + 1
            + ops[i + 1..]
                .iter()
                .take_while(|o| matches!(o, Op::Format(_)))
                .count();
        match ops.get(j) {
            Some(Op::Resize(r))
                if !(r.width.is_some() && r.height.is_some() && r.mode == ResizeMode::Pad) =>
            {
                Some((i, j))
            }
            _ => None,
        }
    })
}

fn round_side(v: f64) -> u64 {
    (v.round() as u64).max(1)
}

/// The size of the whole image once `r` has scaled it, before `m_0` pads or
/// `m_2` crops it to the box. Sides past `u32` saturate; see
/// [`scaled_sides`] for the exact ones.
pub fn scaled_size(r: &Resize, src: (u32, u32)) -> (u32, u32) {
    let (w, h) = scaled_sides(r, src);
    (saturate(w), saturate(h))
}

fn saturate(side: u64) -> u32 {
    u32::try_from(side).unwrap_or(u32::MAX)
}

/// [`scaled_size`] without the saturation: a width of 100000 asked of a
/// 1x60000 image is 6 billion pixels high, as the error says.
fn scaled_sides(r: &Resize, (sw, sh): (u32, u32)) -> (u64, u64) {
    let (fw, fh) = (sw as f64, sh as f64);
    match (r.width, r.height) {
        (Some(w), None) => (w.into(), round_side(fh * w as f64 / fw)),
        (None, Some(h)) => (round_side(fw * h as f64 / fh), h.into()),
        (Some(w), Some(h)) => {
            let (sx, sy) = (w as f64 / fw, h as f64 / fh);
            let (w, h) = (u64::from(w), u64::from(h));
            match r.mode {
                ResizeMode::Pad | ResizeMode::Fit => {
                    let s = sx.min(sy);
                    (round_side(fw * s).min(w), round_side(fh * s).min(h))
                }
                ResizeMode::Cover => {
                    let s = sx.max(sy);
                    (round_side(fw * s).max(w), round_side(fh * s).max(h))
                }
            }
        }
        (None, None) => (sw.into(), sh.into()),
    }
}

/// The centred region of an image of `src` size with the aspect ratio of
/// `box_size`: what a cover resize keeps, as `(left, top, width, height)`.
pub(super) fn cover_region(src: (u32, u32), box_size: (u32, u32)) -> (f64, f64, f64, f64) {
    let (fw, fh) = (src.0 as f64, src.1 as f64);
    let aspect = box_size.0 as f64 / box_size.1 as f64;
    let (cw, ch) = if fw / fh > aspect {
        (fh * aspect, fh)
    } else {
        (fw, fw / aspect)
    };
    ((fw - cw) / 2.0, (fh - ch) / 2.0, cw, ch)
}

/// The final size `r` produces from an image of `src` size, exactly.
fn resized_sides(r: &Resize, src: (u32, u32)) -> (u64, u64) {
    match (r.width, r.height, r.mode) {
        (Some(w), Some(h), ResizeMode::Pad | ResizeMode::Cover) => (w.into(), h.into()),
        _ => scaled_sides(r, src),
    }
}

/// The region `crop` takes from an image of `(w, h)`: `(left, top, width, height)`.
/// Sizes beyond the image are clamped; gravity 9 is resolved by the caller and
/// placed at the centre here.
pub fn crop_rect(crop: &Crop, (iw, ih): (u32, u32)) -> Result<(u32, u32, u32, u32), ImagingError> {
    match crop.anchor {
        CropAnchor::Offset { left, top } => {
            if left >= iw || top >= ih {
                return Err(ImagingError::Operation {
                    op: "crop",
                    message: format!("offset l_{left},t_{top} is outside the {iw}x{ih} image"),
                });
            }
            let w = crop.width.unwrap_or(iw).min(iw - left);
            let h = crop.height.unwrap_or(ih).min(ih - top);
            Ok((left, top, w, h))
        }
        CropAnchor::Gravity(g) => {
            let w = crop.width.unwrap_or(iw).min(iw);
            let h = crop.height.unwrap_or(ih).min(ih);
            let (cx, cy) = ((iw - w) / 2, (ih - h) / 2);
            let (right, bottom) = (iw - w, ih - h);
            let (x, y) = match g {
                Gravity::Center | Gravity::Auto => (cx, cy),
                Gravity::North => (cx, 0),
                Gravity::East => (right, cy),
                Gravity::South => (cx, bottom),
                Gravity::West => (0, cy),
                Gravity::NorthWest => (0, 0),
                Gravity::NorthEast => (right, 0),
                Gravity::SouthWest => (0, bottom),
                Gravity::SouthEast => (right, bottom),
            };
            Ok((x, y, w, h))
        }
    }
}

fn check_side(op: &'static str, (w, h): (u64, u64), limit: u32) -> Result<(), ImagingError> {
    if w > limit.into() || h > limit.into() {
        return Err(ImagingError::OutputTooLarge {
            op,
            width: w,
            height: h,
            limit: format!("{limit} px per side"),
        });
    }
    Ok(())
}

/// The error a resize gives whatever its source: a side it writes out
/// that its output takes exactly (one side given alone, or both in the pad
/// and cover modes) over `limits`, or, in fit mode, both sides over the
/// side limit (one of them is met). A rule holding such a resize is
/// refused when it is set, rather than failing at every event.
pub fn resize_fails_for_every_source(r: &Resize, limits: &super::Limits) -> Option<ImagingError> {
    let side_limit = || format!("{} px per side", limits.max_output_side);
    match (r.width, r.height, r.mode) {
        (Some(w), Some(h), ResizeMode::Pad | ResizeMode::Cover) => {
            check_output_pixels("resize", (w.into(), h.into()), limits).err()
        }
        (Some(w), Some(h), ResizeMode::Fit) => {
            (w.min(h) > limits.max_output_side).then(|| ImagingError::OutputTooLarge {
                op: "resize",
                width: w.into(),
                height: h.into(),
                limit: side_limit(),
            })
        }
        (Some(side), None, _) | (None, Some(side), _) => {
            (side > limits.max_output_side).then(|| ImagingError::Operation {
                op: "resize",
                message: format!(
                    "{}_{side} is over the limit of {}",
                    if r.width.is_some() { "w" } else { "h" },
                    side_limit()
                ),
            })
        }
        (None, None, _) => None,
    }
}

/// A resize's output is held to the pixel limit its input was: each side
/// within bounds can still make 268 million pixels.
fn check_output_pixels(
    op: &'static str,
    (w, h): (u64, u64),
    limits: &super::Limits,
) -> Result<(), ImagingError> {
    check_side(op, (w, h), limits.max_output_side)?;
    if w.saturating_mul(h) > limits.max_pixels {
        return Err(ImagingError::OutputTooLarge {
            op,
            width: w,
            height: h,
            limit: format!("{} pixels", limits.max_pixels),
        });
    }
    Ok(())
}

/// Applies a crop, rotate or resize to every frame.
pub(super) fn apply(
    pixels: &mut Pixels,
    op: &Op,
    limits: &super::Limits,
) -> Result<(), ImagingError> {
    match op {
        Op::Crop(c) => {
            let dims = pixels.dimensions();
            let (mut x, mut y, w, h) = crop_rect(c, dims)?;
            if c.anchor == CropAnchor::Gravity(Gravity::Auto) && (w, h) != dims {
                let first = match pixels {
                    Pixels::Still(img) => smartcrop::attention_origin(img, w, h),
                    Pixels::Animated(frames) => match frames.first() {
                        Some(f) => smartcrop::attention_origin(
                            &DynamicImage::ImageRgba8(f.buffer().clone()),
                            w,
                            h,
                        ),
                        None => (x, y),
                    },
                };
                (x, y) = (first.0.min(dims.0 - w), first.1.min(dims.1 - h));
            }
            if (x, y, w, h) == (0, 0, dims.0, dims.1) {
                return Ok(());
            }
            pixels.for_each_frame(|img| {
                *img = img.crop_imm(x, y, w, h);
                Ok(())
            })
        }
        Op::Rotate(r) => pixels.for_each_frame(|img| {
            *img = match r {
                Rotation::R0 => return Ok(()),
                Rotation::R90 => img.rotate90(),
                Rotation::R180 => img.rotate180(),
                Rotation::R270 => img.rotate270(),
            };
            Ok(())
        }),
        Op::Resize(r) => resize_pixels(pixels, r, None, limits),
        _ => Ok(()),
    }
}

/// Resizes every frame as `r` says. With a `frame`, the pixels are a JPEG
/// the decoder shrank or cut to a region for this resize: the output is
/// sized from the whole image and sampled from exactly the part it covers.
pub(super) fn resize_pixels(
    pixels: &mut Pixels,
    r: &Resize,
    frame: Option<&LeadFrame>,
    limits: &super::Limits,
) -> Result<(), ImagingError> {
    let src = frame.map_or_else(|| pixels.dimensions(), |f| f.size);
    // A cover resize samples its box from the source in one pass, so only
    // the output's size matters, never the scaled whole it is cut from.
    let out = resized_sides(r, src);
    check_output_pixels("resize", out, limits)?;
    let out = (saturate(out.0), saturate(out.1));
    // An animation is checked for its frame count and pixels when it is
    // decoded; enlarging it must stay within the same bound, or a tiny GIF
    // could ask for hundreds of full-size frames.
    if let Pixels::Animated(frames) = pixels {
        let total = u64::from(out.0) * u64::from(out.1) * frames.len() as u64;
        if total > limits.max_animation_pixels {
            return Err(ImagingError::AnimationTooLarge {
                frames: frames.len(),
                width: out.0,
                height: out.1,
                limit: format!("{} frame pixels (resize)", limits.max_animation_pixels),
            });
        }
    }
    // An animation's frames all have alpha, but one whose every pixel is
    // opaque (most GIFs) pads white, as a still image without alpha does.
    let pads = r.width.is_some() && r.height.is_some() && r.mode == ResizeMode::Pad;
    let opaque = match pixels {
        Pixels::Animated(frames) if pads => frames
            .iter()
            .all(|f| f.buffer().pixels().all(|p| p[3] == u8::MAX)),
        _ => false,
    };
    pixels.for_each_frame(|img| {
        *img = resize(img, r, frame, opaque)?;
        Ok(())
    })
}

/// Resizes one image as `r` says, in a single resampling pass. A pad is
/// white, or clear where the image has alpha and is not `opaque`.
fn resize(
    img: &DynamicImage,
    r: &Resize,
    frame: Option<&LeadFrame>,
    opaque: bool,
) -> Result<DynamicImage, ImagingError> {
    let src = frame.map_or_else(|| img.dimensions(), |f| f.size);
    let scaled = scaled_size(r, src);
    // The part of the image to sample, in its pixels: all of it, or with a
    // frame the part the whole image covers.
    let part = |rect: (f64, f64, f64, f64)| match frame {
        Some(f) => Some(f.to_pixels(rect, img.dimensions())),
        None if rect == (0.0, 0.0, f64::from(src.0), f64::from(src.1)) => None,
        None => Some(rect),
    };
    let whole = (0.0, 0.0, f64::from(src.0), f64::from(src.1));
    match (r.width, r.height, r.mode) {
        (Some(w), Some(h), ResizeMode::Cover) => {
            // Sample only the centred source region with the box's aspect ratio.
            resample(img, (w, h), part(cover_region(src, (w, h))))
        }
        (Some(w), Some(h), ResizeMode::Pad) => {
            let inner = resample(img, scaled, part(whole))?;
            if scaled == (w, h) {
                return Ok(inner);
            }
            let (x, y) = ((w - scaled.0) / 2, (h - scaled.1) / 2);
            let mut canvas = match &inner {
                DynamicImage::ImageRgba8(_) if opaque => DynamicImage::ImageRgba8(
                    image::RgbaImage::from_pixel(w, h, image::Rgba([255; 4])),
                ),
                DynamicImage::ImageRgba8(_) => {
                    DynamicImage::ImageRgba8(image::RgbaImage::new(w, h))
                }
                _ => DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
                    w,
                    h,
                    image::Rgb([255, 255, 255]),
                )),
            };
            image::imageops::replace(&mut canvas, &inner, x as i64, y as i64);
            Ok(canvas)
        }
        _ => resample(img, scaled, part(whole)),
    }
}

thread_local! {
    static RESIZER: RefCell<fr::Resizer> = RefCell::new(fr::Resizer::new());
}

/// The most bytes of buffers the resizer keeps for the next image.
const KEEP_RESIZER_BUFFERS: usize = 16 << 20;

fn resample(
    img: &DynamicImage,
    (w, h): (u32, u32),
    crop: Option<(f64, f64, f64, f64)>,
) -> Result<DynamicImage, ImagingError> {
    if crop.is_none() && img.dimensions() == (w, h) {
        return Ok(img.clone());
    }
    let fail = |e: &dyn std::fmt::Display| ImagingError::Operation {
        op: "resize",
        message: e.to_string(),
    };
    let (pixel_type, raw): (fr::PixelType, &[u8]) = match img {
        DynamicImage::ImageRgb8(b) => (fr::PixelType::U8x3, b.as_raw()),
        DynamicImage::ImageRgba8(b) => (fr::PixelType::U8x4, b.as_raw()),
        other => {
            let converted = DynamicImage::ImageRgba8(other.to_rgba8());
            return resample(&converted, (w, h), crop);
        }
    };
    let src = fr::images::ImageRef::new(img.width(), img.height(), raw, pixel_type)
        .map_err(|e| fail(&e))?;
    let mut dst = fr::images::Image::new(w, h, pixel_type);
    let mut options =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3));
    if let Some((l, t, cw, ch)) = crop {
        options = options.crop(l, t, cw, ch);
    }
    RESIZER
        .with(|r| {
            let mut resizer = r.borrow_mut();
            let resized = resizer.resize(&src, &mut dst, &options);
            // The resizer keeps its buffers for the next image on this
            // thread; for an image with alpha they hold a premultiplied
            // copy of the whole source (800 MB kept after a 100-megapixel
            // WebP), and an enlargement's hold a pass of its output, so
            // large ones are let go.
            if resizer.size_of_internal_buffers() > KEEP_RESIZER_BUFFERS {
                resizer.reset_internal_buffers();
            }
            resized
        })
        .map_err(|e| fail(&e))?;
    let buf = dst.into_vec();
    let out = match pixel_type {
        fr::PixelType::U8x3 => image::RgbImage::from_raw(w, h, buf).map(DynamicImage::ImageRgb8),
        _ => image::RgbaImage::from_raw(w, h, buf).map(DynamicImage::ImageRgba8),
    };
    out.ok_or_else(|| fail(&"resized buffer has the wrong size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(action: &str) -> Vec<Op> {
        let action = Action::parse(action).unwrap();
        resize_before_rotate(&action).into_owned().ops
    }

    #[test]
    fn resizes_move_before_quarter_and_half_turns() {
        let parse = |a: &str| Action::parse(a).unwrap().ops;
        assert_eq!(
            ops("rotate:a_90|resize:w_300"),
            parse("resize:h_300|rotate:a_90")
        );
        assert_eq!(
            ops("crop:w_300|rotate:a_270|resize:w_20,h_10,m_2|format:t_png"),
            parse("crop:w_300|resize:w_10,h_20,m_2|rotate:a_270|format:t_png")
        );
        assert_eq!(
            ops("rotate:a_180|resize:w_20,h_10,m_1"),
            parse("resize:w_20,h_10,m_1|rotate:a_180")
        );
        // Past a format, which changes no pixels.
        assert_eq!(
            ops("rotate:a_90|format:t_png|resize:w_300"),
            parse("resize:h_300|rotate:a_90|format:t_png")
        );
        // Through two turns, one at a time.
        assert_eq!(
            ops("rotate:a_90|rotate:a_180|resize:h_50"),
            parse("resize:w_50|rotate:a_90|rotate:a_180")
        );
        // Staying put: padding to both sides, after a_0, not adjacent.
        for kept in [
            "rotate:a_90|resize:w_20,h_10,m_0",
            "rotate:a_90|resize:w_20,h_10",
            "rotate:a_0|resize:w_300",
            "rotate:a_90|watermark:t_aGk|resize:w_300",
            "resize:w_300|rotate:a_90",
        ] {
            assert_eq!(ops(kept), parse(kept), "{kept}");
        }
    }
}
