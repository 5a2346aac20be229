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

/// NeuQuant's sampling factor for a GIF of `frames` frames of `width` x
/// `height`: it trains on every `speed`-th pixel. Every pixel (speed 1)
/// up to 256 Ki pixels a frame and 8 Mi pixels in all, then about that
/// many. Speed 10 for every size, as before, cost 4 dB against speed 1 on
/// the corpus animation at 320x200 and turned a logo's pure red into (187,
/// 29, 2); on a photo of 990x556 speeds 1 to 10 differed by 0.4 dB, while
/// speed 1 took 4.5 times as long as 10. Without the bound on the whole,
/// 300 frames of 512x512 noise took 122 s of a thread (speed 10: about
/// 25 s, as now).
fn gif_speed(width: u32, height: u32, frames: usize) -> i32 {
    let pixels = u64::from(width) * u64::from(height);
    let all = pixels.saturating_mul(frames as u64);
    pixels
        .div_ceil(1 << 18)
        .max(all.div_ceil(8 << 20))
        .clamp(1, 30) as i32
}

/// Encodes `pixels` as `format`. `quality` applies to jpeg and webp (defaults
/// 75 and 80). Animations stay animated as GIF and WebP; other formats take
/// the first frame; a GIF plays as often as `repeat` says. Alpha is kept
/// where the format can hold it, else flattened onto white. A `grey`
/// source whose pixels are still all grey is written with one channel
/// where the format has a grey form (see [`neutral`]).
pub fn encode(
    pixels: &Pixels,
    format: ImageFormat,
    quality: Option<u8>,
    repeat: Repeat,
    grey: bool,
) -> Result<Encoded, ImagingError> {
    let (width, height) = pixels.dimensions();
    check_side(format, width, height)?;
    let bytes = match (pixels, format) {
        (Pixels::Animated(frames), ImageFormat::Gif) => {
            let mut out = Vec::new();
            {
                let mut enc =
                    GifEncoder::new_with_speed(&mut out, gif_speed(width, height, frames.len()));
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
            // WebP counts plays (0: forever), a GIF's extension repeats.
            let loop_count = match repeat {
                Repeat::Infinite => 0,
                Repeat::Finite(n) => n.saturating_add(1),
            };
            super::webp_anim::encode(frames, &webp_config(quality)?, loop_count)
                .map_err(|e| encode_error(format, e))?
        }
        // Other formats take the first frame, copied alone: RGB when the
        // animation is opaque, as a one-frame GIF would be (and as `info`
        // reports it).
        (Pixels::Animated(frames), _) => {
            let first = frames
                .first()
                .ok_or_else(|| encode_error(format, "the animation has no frames"))?;
            let buffer = first.buffer();
            let opaque = frames
                .iter()
                .all(|f| f.buffer().pixels().all(|p| p.0[3] == u8::MAX));
            let still = if opaque {
                DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(buffer.clone()).into_rgb8())
            } else {
                DynamicImage::ImageRgba8(buffer.clone())
            };
            encode_still(&still, format, quality, grey)?
        }
        (Pixels::Still(img), _) => encode_still(img, format, quality, grey)?,
    };
    Ok(Encoded {
        bytes,
        format,
        width,
        height,
    })
}

/// The widest and tallest image a file of `format` can hold, where that is
/// less than any image here: WebP's 16383, libjpeg-turbo's 65500 and GIF's
/// 65535.
fn max_side(format: ImageFormat) -> Option<u32> {
    match format {
        ImageFormat::Webp => Some(16383),
        ImageFormat::Jpeg => Some(65500),
        ImageFormat::Gif => Some(65535),
        _ => None,
    }
}

/// An image too wide or tall for `format` is `output_too_large`, found
/// before the encoder is started, not an encoder's failure.
fn check_side(format: ImageFormat, w: u32, h: u32) -> Result<(), ImagingError> {
    match max_side(format) {
        Some(max) if w > max || h > max => Err(ImagingError::OutputTooLarge {
            op: "format",
            width: w.into(),
            height: h.into(),
            limit: format!("{max} px per side, the most {} can hold", format.name()),
        }),
        _ => Ok(()),
    }
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
    grey: bool,
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
            let grey = (grey && neutral(rgb.as_raw(), 3)).then(|| luma(rgb.as_raw(), 3));
            let (subsamp, pixels, channels, pixel_format) = match &grey {
                Some(grey) => (
                    turbojpeg::Subsamp::Gray,
                    grey.as_slice(),
                    1,
                    turbojpeg::PixelFormat::GRAY,
                ),
                None => (
                    turbojpeg::Subsamp::Sub2x2,
                    rgb.as_raw().as_slice(),
                    3,
                    turbojpeg::PixelFormat::RGB,
                ),
            };
            c.set_subsamp(subsamp)
                .map_err(|e| encode_error(format, e))?;
            c.compress_to_vec(turbojpeg::Image {
                pixels,
                width: w as usize,
                pitch: w as usize * channels,
                height: h as usize,
                format: pixel_format,
            })
            .map_err(|e| encode_error(format, e))
        }
        ImageFormat::Webp => {
            check_side(format, w, h)?;
            let enc = match img {
                DynamicImage::ImageRgba8(b) => webp::Encoder::from_rgba(b.as_raw(), w, h),
                DynamicImage::ImageRgb8(b) => webp::Encoder::from_rgb(b.as_raw(), w, h),
                other => {
                    let rgba = other.to_rgba8();
                    return encode_still(&DynamicImage::ImageRgba8(rgba), format, quality, false);
                }
            };
            let mem = enc
                .encode_advanced(&webp_config(quality)?)
                .map_err(|e| encode_error(format, format!("{e:?}")))?;
            Ok(mem.to_vec())
        }
        ImageFormat::Png => {
            let mut out = Vec::new();
            let channels = usize::from(img.color().channel_count());
            let grey =
                grey && matches!(
                    img,
                    DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_)
                ) && neutral(img.as_bytes(), channels);
            let (bytes, colour) = if grey {
                let colour = if channels == 4 {
                    image::ExtendedColorType::La8
                } else {
                    image::ExtendedColorType::L8
                };
                (
                    std::borrow::Cow::Owned(luma(img.as_bytes(), channels)),
                    colour,
                )
            } else {
                (
                    std::borrow::Cow::Borrowed(img.as_bytes()),
                    img.color().into(),
                )
            };
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
                .write_image(&bytes, w, h, colour)
                .map_err(|e| encode_error(format, e))?;
            Ok(out)
        }
        ImageFormat::Gif => {
            let mut out = Vec::new();
            {
                let mut enc =
                    GifEncoder::new_with_speed(&mut out, gif_speed(img.width(), img.height(), 1));
                let mut rgba = img.to_rgba8();
                binary_alpha(&mut rgba);
                enc.encode_frame(image::Frame::new(rgba))
                    .map_err(|e| encode_error(format, e))?;
            }
            Ok(out)
        }
        ImageFormat::Tiff => encode_tiff(img, grey).map_err(|e| encode_error(format, e)),
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

/// A lossless TIFF, Deflate-compressed with the horizontal predictor (the
/// 2560x1920 Wood photo in 5.2 MB instead of 14.7, written in 40 ms more;
/// libtiff also warned of the predictor tag the encoder always writes when
/// the file was uncompressed), of RGB (grey when [`neutral`]), or of RGBA with its
/// alpha marked as such (`ExtraSamples` = 2, unassociated), which the image
/// crate leaves out: readers then warn, or take the fourth sample for
/// something else.
fn encode_tiff(img: &DynamicImage, grey: bool) -> Result<Vec<u8>, tiff::TiffError> {
    use tiff::encoder::{Compression, DeflateLevel, Predictor, TiffEncoder, colortype};
    use tiff::tags::{ExtraSamples, Tag};
    let (w, h) = (img.width(), img.height());
    let mut out = Cursor::new(Vec::new());
    let mut tiff = TiffEncoder::new(&mut out)?
        .with_compression(Compression::Deflate(DeflateLevel::Fast))
        .with_predictor(Predictor::Horizontal);
    if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut image = tiff.new_image::<colortype::RGBA8>(w, h)?;
        image
            .encoder()
            .write_tag(Tag::ExtraSamples, ExtraSamples::UnassociatedAlpha.to_u16())?;
        image.write_data(rgba.as_raw())?;
    } else {
        let rgb = img.to_rgb8();
        if grey && neutral(rgb.as_raw(), 3) {
            tiff.write_image::<colortype::Gray8>(w, h, &luma(rgb.as_raw(), 3))?;
        } else {
            tiff.write_image::<colortype::RGB8>(w, h, rgb.as_raw())?;
        }
    }
    Ok(out.into_inner())
}

/// Whether every pixel of `samples` (RGB or RGBA, `channels` a pixel) is
/// grey: red, green and blue alike. A greyscale source stays so through
/// every operation that adds no colour (resizing works on each channel
/// alike), and is then written with one channel, as libvips, sharp and
/// Pillow keep it: a third of the samples for PNG and TIFF, no chroma for
/// JPEG. Colour added on the way (a red text) shows here. An RGB source
/// stays RGB however grey its pixels, as it does with those peers.
fn neutral(samples: &[u8], channels: usize) -> bool {
    samples
        .chunks_exact(channels)
        .all(|p| p[0] == p[1] && p[1] == p[2])
}

/// The grey of each pixel of a [`neutral`] image (with its alpha, for RGBA).
fn luma(samples: &[u8], channels: usize) -> Vec<u8> {
    match channels {
        4 => samples.chunks_exact(4).flat_map(|p| [p[0], p[3]]).collect(),
        _ => samples.chunks_exact(channels).map(|p| p[0]).collect(),
    }
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
