use std::io::Cursor;

use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ImageEncoder, RgbImage, RgbaImage};

use super::{Encoded, ImageFormat, ImagingError, Pixels};

fn encode_error(format: ImageFormat, e: impl std::fmt::Display) -> ImagingError {
    ImagingError::Encode {
        format: format.name(),
        message: e.to_string(),
    }
}

/// Encodes `pixels` as `format`. `quality` applies to jpeg and webp (defaults
/// 75 and 80). Animations stay animated as GIF and WebP; other formats take
/// the first frame; a GIF plays as often as `repeat` says. Alpha is kept where the format can hold it, else flattened onto white.
pub fn encode(
    pixels: &Pixels,
    format: ImageFormat,
    quality: Option<u8>,
    repeat: Repeat,
) -> Result<Encoded, ImagingError> {
    let (width, height) = pixels.dimensions();
    let bytes = match (pixels, format) {
        (Pixels::Animated(frames), ImageFormat::Gif) => {
            let mut out = Vec::new();
            {
                let mut enc = GifEncoder::new_with_speed(&mut out, 10);
                enc.set_repeat(repeat)
                    .map_err(|e| encode_error(format, e))?;
                enc.encode_frames(frames.iter().map(|f| {
                    let mut buffer = f.buffer().clone();
                    binary_alpha(&mut buffer);
                    image::Frame::from_parts(buffer, f.left(), f.top(), f.delay())
                }))
                .map_err(|e| encode_error(format, e))?;
            }
            out
        }
        (Pixels::Animated(frames), ImageFormat::Webp) => {
            check_webp_size(width, height)?;
            // WebP counts plays (0: forever), a GIF's extension repeats.
            let loop_count = match repeat {
                Repeat::Infinite => 0,
                Repeat::Finite(n) => n.saturating_add(1),
            };
            super::webp_anim::encode(frames, &webp_config(quality)?, loop_count)
                .map_err(|e| encode_error(format, e))?
        }
        // Other formats take the first frame, copied alone.
        (Pixels::Animated(frames), _) => {
            let first = frames
                .first()
                .ok_or_else(|| encode_error(format, "the animation has no frames"))?;
            encode_still(
                &DynamicImage::ImageRgba8(first.buffer().clone()),
                format,
                quality,
            )?
        }
        (Pixels::Still(img), _) => encode_still(img, format, quality)?,
    };
    Ok(Encoded {
        bytes,
        format,
        width,
        height,
    })
}

/// The widest and tallest image a WebP file can hold.
const WEBP_MAX_SIDE: u32 = 16383;

fn check_webp_size(w: u32, h: u32) -> Result<(), ImagingError> {
    if w > WEBP_MAX_SIDE || h > WEBP_MAX_SIDE {
        return Err(ImagingError::OutputTooLarge {
            op: "format",
            width: w.into(),
            height: h.into(),
            limit: format!("{WEBP_MAX_SIDE} px per side, the most WebP can hold"),
        });
    }
    Ok(())
}

/// Lossy at `quality` (80 by default) and method 4, sharp's default effort.
fn webp_config(quality: Option<u8>) -> Result<webp::WebPConfig, ImagingError> {
    let mut config = webp::WebPConfig::new()
        .map_err(|_| encode_error(ImageFormat::Webp, "cannot set up the encoder"))?;
    config.quality = f32::from(quality.unwrap_or(80));
    config.method = 4;
    Ok(config)
}

fn encode_still(
    img: &DynamicImage,
    format: ImageFormat,
    quality: Option<u8>,
) -> Result<Vec<u8>, ImagingError> {
    let (w, h) = (img.width(), img.height());
    match format {
        ImageFormat::Jpeg => {
            let flat;
            let rgb: &RgbImage = match img {
                DynamicImage::ImageRgb8(b) => b,
                other => {
                    flat = flatten_on_white(other);
                    &flat
                }
            };
            let mut c = turbojpeg::Compressor::new().map_err(|e| encode_error(format, e))?;
            c.set_quality(quality.unwrap_or(75) as i32)
                .map_err(|e| encode_error(format, e))?;
            c.set_subsamp(turbojpeg::Subsamp::Sub2x2)
                .map_err(|e| encode_error(format, e))?;
            c.compress_to_vec(turbojpeg::Image {
                pixels: rgb.as_raw().as_slice(),
                width: w as usize,
                pitch: w as usize * 3,
                height: h as usize,
                format: turbojpeg::PixelFormat::RGB,
            })
            .map_err(|e| encode_error(format, e))
        }
        ImageFormat::Webp => {
            check_webp_size(w, h)?;
            let enc = match img {
                DynamicImage::ImageRgba8(b) => webp::Encoder::from_rgba(b.as_raw(), w, h),
                DynamicImage::ImageRgb8(b) => webp::Encoder::from_rgb(b.as_raw(), w, h),
                other => {
                    let rgba = other.to_rgba8();
                    return encode_still(&DynamicImage::ImageRgba8(rgba), format, quality);
                }
            };
            let mem = enc
                .encode_advanced(&webp_config(quality)?)
                .map_err(|e| encode_error(format, format!("{e:?}")))?;
            Ok(mem.to_vec())
        }
        ImageFormat::Png => {
            let mut out = Vec::new();
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
                .write_image(img.as_bytes(), w, h, img.color().into())
                .map_err(|e| encode_error(format, e))?;
            Ok(out)
        }
        // Quantised as animations are (NeuQuant at speed 10): `image`'s
        // default for a still GIF, speed 1, trains on every pixel, which
        // takes minutes of a thread for an image at the pixel limit.
        ImageFormat::Gif => {
            let mut out = Vec::new();
            {
                let mut enc = GifEncoder::new_with_speed(&mut out, 10);
                let mut rgba = img.to_rgba8();
                binary_alpha(&mut rgba);
                enc.encode_frame(image::Frame::new(rgba))
                    .map_err(|e| encode_error(format, e))?;
            }
            Ok(out)
        }
        ImageFormat::Tiff => encode_tiff(img).map_err(|e| encode_error(format, e)),
        ImageFormat::Bmp => {
            let mut out = Cursor::new(Vec::new());
            let flat;
            let img = if img.color().has_alpha() {
                flat = DynamicImage::ImageRgb8(flatten_on_white(img));
                &flat
            } else {
                img
            };
            img.write_to(&mut out, image::ImageFormat::Bmp)
                .map_err(|e| encode_error(format, e))?;
            Ok(out.into_inner())
        }
    }
}

/// An uncompressed TIFF (libvips' default too) of RGB, or of RGBA with its
/// alpha marked as such (`ExtraSamples` = 2, unassociated), which the image
/// crate leaves out: readers then warn, or take the fourth sample for
/// something else.
fn encode_tiff(img: &DynamicImage) -> Result<Vec<u8>, tiff::TiffError> {
    use tiff::encoder::{TiffEncoder, colortype};
    use tiff::tags::{ExtraSamples, Tag};
    let (w, h) = (img.width(), img.height());
    let mut out = Cursor::new(Vec::new());
    let mut tiff = TiffEncoder::new(&mut out)?;
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut image = tiff.new_image::<colortype::RGBA8>(w, h)?;
        image
            .encoder()
            .write_tag(Tag::ExtraSamples, ExtraSamples::UnassociatedAlpha.to_u16())?;
        image.write_data(rgba.as_raw())?;
    } else {
        let rgb = img.to_rgb8();
        tiff.write_image::<colortype::RGB8>(w, h, rgb.as_raw())?;
    }
    Ok(out.into_inner())
}

/// Makes every pixel opaque or clear, at half coverage, as a GIF can hold
/// only those: the encoder takes any alpha above 0 for opaque, so the faint
/// ringing a resize leaves beside an edge would come out as a dotted outline.
fn binary_alpha(rgba: &mut RgbaImage) {
    for p in rgba.pixels_mut() {
        if p[3] < 128 {
            p.0 = [0; 4];
        } else {
            p[3] = u8::MAX;
        }
    }
}

/// Composites an image with alpha over white.
fn flatten_on_white(img: &DynamicImage) -> RgbImage {
    let rgba = img.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let a = src[3] as u32;
        for c in 0..3 {
            dst[c] = ((src[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}
